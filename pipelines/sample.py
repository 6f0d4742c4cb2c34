"""Sample a saved pipeline from the command line into PNG grids: a row per class, a column per seed.

    diffusers-cfg-sample cfg-mnist --labels 3 7 --guidance_scales 1 4 --num_seeds 8 --output grid.png
    python -m diffusers_cfg.pipelines.sample cfg-mnist --scheduler dpm++ --num_inference_steps 20
"""

import argparse
import logging
import math
import os

import diffusers
import torch
from PIL import Image

from diffusers_cfg.pipelines.command_line import check_writable_parent, configure_logging, resolve_device
from diffusers_cfg.pipelines.pipeline_class_conditional import ClassConditionalPipeline

logger = logging.getLogger(__name__)

# Short names for the schedulers people usually swap in; any diffusers scheduler class name works too.
SCHEDULER_ALIASES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def scheduler_class(name: str):
    """Resolve a short alias or a diffusers scheduler class name."""
    class_name = SCHEDULER_ALIASES.get(name.lower(), name)
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None or not class_name.endswith("Scheduler"):
        raise ValueError(
            f"--scheduler {name!r} is not a diffusers scheduler; use one of {sorted(SCHEDULER_ALIASES)} or a class "
            "name such as DPMSolverMultistepScheduler"
        )
    return scheduler_cls


def grid_path(output: str, scale: float, several: bool) -> str:
    if not several:
        return output
    stem, extension = os.path.splitext(output)
    return f"{stem}_s{scale:g}{extension}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample a class-conditional pipeline into PNG grids (rows: classes, columns: seeds).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pretrained", help="Saved pipeline folder or Hub id.")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="Class ids or names, one grid row each; all classes when omitted.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=None,
                        help="Guidance scales s (w = s - 1), one grid each; the pipeline's default when omitted.")
    parser.add_argument("--num_seeds", type=int, default=8, help="Grid columns: one seed each.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first column; column j uses seed + j.")
    parser.add_argument("--scheduler", default=None,
                        help=f"Scheduler to sample with: {', '.join(SCHEDULER_ALIASES)} or a diffusers class name; "
                             "the saved one when omitted.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--output", default="samples.png",
                        help="PNG path; with several guidance scales, _s<scale> is added before the extension.")
    parser.add_argument("--revision", default=None, help="Hub revision to load.")
    parser.add_argument("--device", default=None, help="torch device; cuda when available, else cpu.")
    args = parser.parse_args(argv)
    if args.num_seeds < 1:
        parser.error(f"--num_seeds must be at least 1, got {args.num_seeds}")
    return args


def parse_label(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def check_guidance_scales(scales: list | None) -> None:
    """Raise a ValueError for a scale the pipeline rejects, or for a scale given twice, which would overwrite a grid."""
    if scales is None:
        return
    for scale in scales:
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(
                f"--guidance_scales {scale:g} is invalid: a scale must be finite and >= 0 (s = 0 is unconditional, "
                "s = 1 plain conditional)"
            )
    repeated = sorted({scale for scale in scales if scales.count(scale) > 1})
    if repeated:
        raise ValueError(f"--guidance_scales lists {', '.join(f'{scale:g}' for scale in repeated)} more than once, "
                         "which would write the same grid file twice. Give distinct scales")  # fmt: skip


def check_output(output: str) -> None:
    """Raise a ValueError unless `output` is an image file path that PIL can write, in a folder that can be written."""
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        example = os.path.join(output, "samples.png")
        raise ValueError(f"--output {output!r} is a folder; give an image file path such as {example!r}")
    extension = os.path.splitext(output)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format not in Image.SAVE:
        raise ValueError(f"--output {output!r} does not end in an image file extension that Pillow can write; give a "
                         "path ending in .png")  # fmt: skip
    if os.path.isfile(output):
        if not os.access(output, os.W_OK):
            raise ValueError(f"--output {output!r} is not writable: the file exists and does not allow writing")
    else:
        check_writable_parent("--output", output)


def main(argv=None) -> None:
    """Run the sample command; the console script exits with status 0 when this returns."""
    run(argv)


def run(argv=None) -> list:
    """Sample the grids that `argv` requests and return their paths. Invalid input exits with a one-line error."""
    args = parse_args(argv)
    configure_logging(logger)
    try:
        return sample_grids(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: {error}") from error


def sample_grids(args: argparse.Namespace) -> list:
    """Write one grid per guidance scale and return their paths."""
    check_guidance_scales(args.guidance_scales)
    check_output(args.output)
    device = resolve_device("--device", args.device)
    pipe = ClassConditionalPipeline.from_pretrained(args.pretrained, revision=args.revision).to(device)
    if args.scheduler is not None:
        # set_scheduler keeps the noise schedule the UNet was trained on; from_config alone may not (Heun).
        pipe.set_scheduler(scheduler_class(args.scheduler))
    pipe.set_progress_bar_config(disable=True)

    # A class name wins over a number: an imagefolder with folders "3" and "7" names ids 0 and 1 "3" and "7".
    if args.labels:
        labels = [text if text in pipe.labels else parse_label(text) for text in args.labels]
    else:
        labels = list(range(pipe.num_classes))
    label_ids = pipe.prepare_class_labels(labels).tolist()
    scales = args.guidance_scales or [pipe.config.default_guidance_scale]
    written = []
    for scale in scales:
        # Row-major grid: every row is one class, every column one seed shared by all rows.
        row_labels = [label for label in label_ids for _ in range(args.num_seeds)]
        generators = [torch.Generator().manual_seed(args.seed + column) for _ in label_ids for column in range(args.num_seeds)]
        images = pipe(
            class_labels=row_labels,
            guidance_scale=scale,
            num_inference_steps=args.num_inference_steps,
            generator=generators,
            output_type="pil",
        ).images
        # make_image_grid pastes onto an RGB canvas; keep grayscale models' grids in mode "L".
        grid = diffusers.utils.make_image_grid(images, rows=len(label_ids), cols=args.num_seeds).convert(images[0].mode)
        path = grid_path(args.output, scale, len(scales) > 1)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        grid.save(path)
        written.append(path)
        logger.info("Wrote %s: classes %s by %d seeds, s = %g (w = %g), %s with %d steps", path, labels,
                    args.num_seeds, scale, scale - 1, pipe.scheduler.__class__.__name__, args.num_inference_steps)  # fmt: skip
    return written


if __name__ == "__main__":
    main()
