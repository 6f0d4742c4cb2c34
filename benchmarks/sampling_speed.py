"""Guided sampling speed of ClassConditionalPipeline against plain loops, and what guidance_interval saves.

    python benchmarks/sampling_speed.py                            # the pipeline saved in ./cfg-mnist
    python benchmarks/sampling_speed.py --pipeline_dir path/to/pipeline --compile --channels_last
    python benchmarks/sampling_speed.py --device cuda --mixed_precision bf16 --compile --batch_size 500

Part 1 times, in interleaved rounds (see harness.py), the sampling of --batch_size images at 50 DDIM steps and
guidance scale s = 4 by
- pipeline: ClassConditionalPipeline.__call__ at its defaults (fp32 unless --mixed_precision says otherwise);
- plain loop, one 2B call: a loop in fp32, eager, with one UNet call on the labeled and null inputs batched (2B
  rows) per step, the guidance formula, and the scheduler's step;
- plain loop, two B calls: the same with separate UNet calls for the labeled and the null input;
- with --compile or --channels_last: the pipeline with its UNet compiled or in channels_last.

Part 2 samples class-balanced images at each --guidance_intervals setting, counts the UNet rows (images passed
through the UNet) per image, and scores the samples with the project's evaluation classifier. Without a saved
pipeline at --pipeline_dir, a randomly initialised UNet of training's default size is timed instead, and class
accuracy is skipped.
"""

import argparse
import copy
import json
import os

import torch

import harness
from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import DEFAULT_DATASET, load_labeled_images
from diffusers_cfg.training.evaluation import autocast_context, evaluate_guidance_scales
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, sampling_scheduler

DEFAULT_INTERVALS = ["0.28,5.42", "1,inf", "0,1"]


@torch.no_grad()
def plain_guided_sampling(unet, scheduler, labels, guidance_scale: float, num_inference_steps: int, generator,
                          two_calls: bool = False) -> torch.Tensor:  # fmt: skip
    """Sample with classifier-free guidance in a plain loop, and return the final latents (images in about [-1, 1]).

    The null label is the last class-embedding row, as in training.
    """
    device = labels.device
    null_labels = torch.full_like(labels, unet.config.num_class_embeds - 1)
    scheduler.set_timesteps(num_inference_steps, device=device)
    size = unet.config.sample_size
    shape = (len(labels), unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        if two_calls:
            conditional = unet(model_input, t, class_labels=labels).sample
            unconditional = unet(model_input, t, class_labels=null_labels).sample
        else:
            both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([labels, null_labels])).sample
            conditional, unconditional = both.chunk(2)
        guided = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


class UNetRowCounter:
    """Count the UNet's forward calls and the rows (images) they process."""

    def __init__(self, unet):
        self.calls = 0
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]

    def remove(self):
        self.handle.remove()


class WithGuidanceInterval:
    """A pipeline whose calls all get `guidance_interval`, for evaluation helpers that do not pass it."""

    def __init__(self, pipe, interval):
        self.pipe = pipe
        self.interval = interval

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        return self.pipe(guidance_interval=self.interval, **kwargs)


def load_pipeline(args: argparse.Namespace, device: torch.device) -> ClassConditionalPipeline:
    """Load the saved pipeline, or build one with a randomly initialised default UNet when the folder is missing."""
    if os.path.isdir(args.pipeline_dir):
        pipe = ClassConditionalPipeline.from_pretrained(args.pipeline_dir)
    else:
        torch.manual_seed(0)
        unet = build_unet(args.resolution, 1, args.num_classes, args.block_out_channels)
        scheduler = sampling_scheduler(build_noise_scheduler(prediction_type="v_prediction"))
        pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def dataset_of(pipeline_dir: str) -> str:
    """Return the dataset name that training wrote into the pipeline folder, or training's default dataset."""
    path = os.path.join(pipeline_dir, "training_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("dataset_name", DEFAULT_DATASET)
    return DEFAULT_DATASET


def parse_interval(text: str) -> tuple:
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --guidance_intervals takes pairs LOW,HIGH such as 0.28,5.42 or 1,inf; got {text!r}")
    return low, high


def build_variants(pipe, args, device, labels) -> list:
    """Return the timed variants; each samples `labels` with the same starting noise."""
    steps, scale = args.num_inference_steps, args.guidance_scale

    def pipeline_run(pipeline):
        def run():
            generator = torch.Generator(device).manual_seed(0)
            with autocast_context(device, args.mixed_precision):
                return pipeline(class_labels=labels, guidance_scale=scale, num_inference_steps=steps,
                                generator=generator).images  # fmt: skip

        return run

    def plain_run(two_calls):
        unet, scheduler = pipe.unet, copy.deepcopy(pipe.scheduler)

        def run():
            generator = torch.Generator(device).manual_seed(0)
            return plain_guided_sampling(unet, scheduler, labels, scale, steps, generator, two_calls)

        return run

    count = len(labels)
    variants = [
        harness.Variant("pipeline", pipeline_run(pipe), count),
        harness.Variant("plain loop, one 2B call", plain_run(False), count),
        harness.Variant("plain loop, two B calls", plain_run(True), count),
    ]
    if args.channels_last:
        variant_pipe = copy.deepcopy(pipe)
        variant_pipe.unet.to(memory_format=torch.channels_last)
        variants.append(harness.Variant("pipeline + channels_last", pipeline_run(variant_pipe), count))
    if args.compile:
        variant_pipe = copy.deepcopy(pipe)
        variant_pipe.unet = torch.compile(variant_pipe.unet, backend=args.compile_backend)
        variants.append(harness.Variant(f"pipeline + torch.compile ({args.compile_backend})", pipeline_run(variant_pipe),
                                        count))  # fmt: skip
    return variants


def compare_guidance_intervals(pipe, args, device, intervals, classifier) -> list:
    """Sample at full guidance and at each interval; return one row per setting with UNet rows and class accuracy."""
    rows = []
    for interval in [None, *intervals]:
        counter = UNetRowCounter(pipe.unet)
        sampled = WithGuidanceInterval(pipe, interval)
        accuracy = None
        try:
            if classifier is not None:
                result = evaluate_guidance_scales(
                    sampled, classifier, [args.guidance_scale], args.samples_per_class, args.num_inference_steps,
                    mixed_precision=args.mixed_precision, batch_size=args.batch_size,
                )  # fmt: skip
                accuracy, images = result[0]["class_accuracy"], result[0]["num_samples"]
            else:
                labels = torch.arange(args.batch_size, device=device) % pipe.num_classes
                with autocast_context(device, args.mixed_precision):
                    sampled(class_labels=labels, guidance_scale=args.guidance_scale,
                            num_inference_steps=args.num_inference_steps, output_type="pt")  # fmt: skip
                images = args.batch_size
        finally:
            counter.remove()
        label = "full guidance" if interval is None else f"guidance_interval ({interval[0]:g}, {interval[1]:g}]"
        rows.append({"setting": label, "rows_per_image": counter.rows / images, "accuracy": accuracy})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pipeline_dir", default="cfg-mnist",
                       help="Saved pipeline to time and score; a random default UNet is timed when it is missing.")
    model.add_argument("--resolution", type=int, default=28, help="Image size of the random UNet (no pipeline).")
    model.add_argument("--num_classes", type=int, default=10, help="Classes of the random UNet (no pipeline).")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                       help="Channels per block of the random UNet (no pipeline); training's default when omitted.")
    work = parser.add_argument_group("sampling work")
    work.add_argument("--batch_size", type=int, default=20, help="Images per timed sampling run and per batch of part 2.")
    work.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps.")
    work.add_argument("--guidance_scale", type=float, default=4.0, help="Guidance scale s (w = s - 1).")
    work.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                      help="Autocast around the pipeline's calls; the plain loops always run in fp32.")
    work.add_argument("--guidance_intervals", nargs="*", default=DEFAULT_INTERVALS, metavar="LOW,HIGH",
                      help="Noise-level ranges (sigma units) for part 2; guidance applies where LOW < sigma <= HIGH.")
    work.add_argument("--samples_per_class", type=int, default=10,
                      help="Samples per class scored at each setting of part 2; 0 skips the class accuracy.")
    harness.add_device_arguments(parser)
    harness.add_timing_arguments(parser, rounds=3, repeats=1, warmup=1)
    args = parser.parse_args(argv)
    harness.check_positive(args, ["batch_size", "num_inference_steps", "rounds", "repeats"])
    if args.samples_per_class < 0:
        raise SystemExit(f"error: --samples_per_class must be at least 0, got {args.samples_per_class}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    intervals = [parse_interval(text) for text in args.guidance_intervals]
    device = harness.select_device(args.device)
    pipe = load_pipeline(args, device)
    print(harness.describe_machine(device))
    if os.path.isdir(args.pipeline_dir):
        print(f"pipeline {args.pipeline_dir}", end="")
    else:
        print(f"no saved pipeline at {args.pipeline_dir}: timing a randomly initialised UNet; class accuracy is "
              "skipped", end="")  # fmt: skip
    print(f", UNet {tuple(pipe.unet.config.block_out_channels)} at {pipe.unet.config.sample_size}x"
          f"{pipe.unet.config.sample_size}, {pipe.scheduler.__class__.__name__}, {args.num_inference_steps} steps, "
          f"s = {args.guidance_scale:g}, {args.batch_size} images per run, pipeline precision {args.mixed_precision}\n",
          flush=True)  # fmt: skip

    # 1. Speed
    labels = torch.arange(args.batch_size, device=device) % pipe.num_classes
    variants = build_variants(pipe, args, device, labels)
    harness.time_interleaved(variants, args.rounds, args.repeats, args.warmup, device)
    harness.print_rates(variants)

    # 2. UNet rows and class accuracy per guidance interval
    classifier = None
    if os.path.isdir(args.pipeline_dir) and args.samples_per_class > 0:
        data = load_labeled_images(dataset_of(args.pipeline_dir))
        classifier, info = load_or_train_classifier(data, pipe.unet.config.sample_size, pipe.unet.config.in_channels)
        print(f"\nclass accuracy: {args.samples_per_class} samples per class, scored by the evaluation classifier of "
              f"{data.name} ({100 * info['test_accuracy']:.1f}% on real test images)")  # fmt: skip
    settings = compare_guidance_intervals(pipe, args, device, intervals, classifier)
    print("\nsetting                                 UNet rows per image   class accuracy")
    for row in settings:
        accuracy = "n/a" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        print(f"{row['setting']:<40s}{row['rows_per_image']:>10.1f}   {accuracy:>18s}")

    pipeline, batched, separate = variants[:3]
    ratios = [
        ("pipeline / plain loop, one 2B call (images/s)", pipeline.images_per_second() / batched.images_per_second()),
        ("pipeline / plain loop, two B calls (images/s)", pipeline.images_per_second() / separate.images_per_second()),
        ("plain loop, one 2B call / two B calls (images/s)",
         batched.images_per_second() / separate.images_per_second()),
    ]  # fmt: skip
    for variant in variants[3:]:
        ratios.append((f"{variant.name} / pipeline (images/s)",
                       variant.images_per_second() / pipeline.images_per_second()))  # fmt: skip
    full = settings[0]
    for row in settings[1:]:
        ratios.append((f"UNet rows per image, {row['setting']} / full guidance",
                       row["rows_per_image"] / full["rows_per_image"]))  # fmt: skip
        if row["accuracy"] is not None and full["accuracy"]:
            ratios.append((f"class accuracy, {row['setting']} / full guidance", row["accuracy"] / full["accuracy"]))
    harness.print_ratios(ratios)


if __name__ == "__main__":
    main()
