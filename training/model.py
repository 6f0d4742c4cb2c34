"""The class-conditional UNet, its noise schedule, and the label dropout that teaches it p(x) beside p(x|c)."""

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

# The smallest feature map the UNet's deepest block works on.
MIN_FEATURE_SIZE = 4
# Width of the first block; each deeper block doubles it. Measured on 2 AVX2 cores (no bf16), a UNet of (16, 32, 64)
# channels trained 3.4x more images per second than (32, 64, 128) at 28x28 (benchmarks/training_throughput.py).
DEFAULT_BASE_CHANNELS = 16
MAX_LEVELS = 4


def default_levels(resolution: int) -> int:
    """Number of UNet resolution levels: halve while the size stays even and at least `MIN_FEATURE_SIZE`."""
    levels = 1
    size = resolution
    while levels < MAX_LEVELS and size % 2 == 0 and size // 2 >= MIN_FEATURE_SIZE:
        size //= 2
        levels += 1
    return levels


def check_resolution(resolution: int, levels: int) -> None:
    """Raise a ValueError, with the nearest working sizes, when `levels` blocks cannot halve `resolution` evenly."""
    factor = 2 ** (levels - 1)
    if resolution >= factor and resolution % factor == 0:
        return
    below = resolution // factor * factor
    suggestions = " or ".join(str(size) for size in (below, below + factor) if size >= factor)
    raise ValueError(
        f"--resolution {resolution} cannot be halved evenly {levels - 1} times by a UNet of {levels} blocks; "
        f"use a multiple of {factor}, such as {suggestions}, or give fewer --block_out_channels"
    )


def default_block_out_channels(resolution: int, base_channels: int = DEFAULT_BASE_CHANNELS) -> tuple:
    levels = default_levels(resolution)
    if resolution >= 16 and levels < 3:
        # Fewer than two halvings leaves a large image with a tiny receptive field: ask for a size that halves.
        check_resolution(resolution, 3)
    return tuple(base_channels * min(2**level, 4) for level in range(levels))


def build_unet(
    resolution: int,
    channels: int,
    num_classes: int,
    block_out_channels: tuple | None = None,
    layers_per_block: int = 1,
    attention_levels: tuple = (),
) -> UNet2DModel:
    """A `UNet2DModel` with `num_classes + 1` class embeddings: the last one is the null label.

    `attention_levels` lists the block indices (0 = full resolution) that get self-attention.
    """
    if block_out_channels is None:
        block_out_channels = default_block_out_channels(resolution)
    block_out_channels = tuple(block_out_channels)
    check_resolution(resolution, len(block_out_channels))
    invalid = [level for level in attention_levels if not 0 <= level < len(block_out_channels)]
    if invalid:
        raise ValueError(f"--attention_levels {invalid} must be block indices in [0, {len(block_out_channels)})")

    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(block_out_channels)))
    up = tuple(
        "AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(block_out_channels)))
    )
    groups = min(32, *block_out_channels)
    while any(width % groups for width in block_out_channels):
        groups //= 2
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=groups,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,
    )


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction_type: str = "epsilon"):
    """The training noise schedule. Clipping is off, because it only applies when sampling and the pipeline owns it."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(noise_scheduler) -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM on the training schedule, without clipping."""
    return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)


def drop_labels(class_labels: torch.Tensor, drop_prob: float, null_class_id: int, generator=None) -> torch.Tensor:
    """Replace each label, independently with probability `drop_prob`, by the null id; the input is not changed."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {drop_prob}")
    device = generator.device if generator is not None else class_labels.device
    drop = torch.rand(class_labels.shape, generator=generator, device=device).to(class_labels.device) < drop_prob
    return torch.where(drop, torch.full_like(class_labels, null_class_id), class_labels)
