"""Sample a trained pipeline class by class and score the samples with the cached classifier."""

import contextlib
import logging

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from diffusers_cfg.training.metrics import class_accuracy

logger = logging.getLogger(__name__)


def guidance_weight(guidance_scale: float) -> float:
    """Return the weight w of Ho & Salimans (2022) for a diffusers guidance scale s: w = s - 1."""
    return guidance_scale - 1.0


def cpu_supports_bf16() -> bool:
    """Check whether this CPU has native bf16 matrix units (AVX-512 BF16 or AMX), without which bf16 is emulated and slow."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(device: torch.device, mixed_precision: str):
    """Return an autocast context for "bf16" or "fp16", or a no-op context for "no"."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sample_class_balanced(
    pipe,
    samples_per_class: int,
    guidance_scale: float,
    num_inference_steps: int = 50,
    batch_size: int = 250,
    seed: int = 0,
    mixed_precision: str = "no",
    class_ids=None,
    clip_sample: bool | None = None,
):
    """Draw `samples_per_class` images of every class (or of `class_ids`).

    Image i uses its own generator seeded with `seed + i`, so a sample does not depend on the batch size. Returns
    images in [-1, 1] as a float tensor (N, C, H, W) and the requested labels (N,). `clip_sample` goes to the
    pipeline: None follows the scheduler's config.
    """
    class_ids = list(range(pipe.num_classes)) if class_ids is None else list(class_ids)
    labels = torch.tensor(class_ids, dtype=torch.long).repeat_interleave(samples_per_class)
    chunks = []
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch_labels))]
        with autocast_context(pipe.device, mixed_precision):
            images = pipe(
                class_labels=batch_labels,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=generators,
                clip_sample=clip_sample,
                output_type="pt",
            ).images
        chunks.append(images.float().cpu() * 2 - 1)
    return torch.cat(chunks), labels


def score_samples(classifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Class accuracy of samples: the share the classifier assigns to the requested class, overall and per class."""
    predicted = classifier.predict(images)
    return class_accuracy(predicted.numpy(), labels.numpy(), num_classes)


def evaluate_guidance_scales(
    pipe,
    classifier,
    guidance_scales,
    samples_per_class: int,
    num_inference_steps: int = 50,
    seed: int = 0,
    mixed_precision: str = "no",
    batch_size: int = 250,
) -> list:
    """Class accuracy of class-balanced samples at each guidance scale, as one dict per scale."""
    results = []
    for scale in guidance_scales:
        images, labels = sample_class_balanced(
            pipe, samples_per_class, scale, num_inference_steps, batch_size, seed, mixed_precision
        )
        scores = score_samples(classifier, images, labels, pipe.num_classes)
        results.append(
            {
                "guidance_scale": float(scale),
                "guidance_weight": guidance_weight(float(scale)),
                "num_samples": len(labels),
                "num_inference_steps": num_inference_steps,
                "scheduler": pipe.scheduler.__class__.__name__,
                "class_accuracy": scores["accuracy"],
                "per_class_accuracy": [None if np.isnan(v) else v for v in scores["per_class_accuracy"]],
            }
        )
        logger.info("s = %g (w = %g): class accuracy %.1f%% on %d samples", scale, scale - 1, 100 * scores["accuracy"], len(labels))
    return results


def image_grid(images: torch.Tensor, rows: int, cols: int) -> Image.Image:
    """Arrange images in [-1, 1] (rows * cols, C, H, W) into one PIL grid, row by row."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    tiles = [Image.fromarray(tile[..., 0] if mode == "L" else tile, mode=mode) for tile in pixels]
    # make_image_grid pastes onto an RGB canvas, so convert back to keep grayscale grids in mode "L".
    return make_image_grid(tiles, rows=rows, cols=cols).convert(mode)
