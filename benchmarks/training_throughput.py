"""Training throughput of UNet widths and autocast modes, measured side by side in one run.

    python benchmarks/training_throughput.py [--steps 6] [--batch_size 128] [--resolution 28]

Each configuration runs a few full training steps (forward, fp32 loss, backward, AdamW) on random data shaped
like builtin:mnist-5k; the median step time gives images per second. Ratios against the first configuration
(the default UNet in fp32) come last. Run it on an otherwise idle machine: other processes on the same cores
distort every figure.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffusers_cfg.training.evaluation import cpu_supports_bf16
from diffusers_cfg.training.model import build_unet, default_block_out_channels


def images_per_second(block_out_channels, resolution, batch_size, steps, bf16) -> float:
    torch.manual_seed(0)
    unet = build_unet(resolution, 1, 10, block_out_channels)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 1, resolution, resolution)
    timesteps = torch.randint(0, 1000, (batch_size,))
    labels = torch.randint(0, 11, (batch_size,))
    durations = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels and is not counted
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = unet(images, timesteps, class_labels=labels).sample
        loss = F.mse_loss(prediction.float(), images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        durations.append(time.perf_counter() - start)
    return batch_size / statistics.median(durations[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="Timed training steps per configuration.")
    parser.add_argument("--batch_size", type=int, default=128, help="Images per step.")
    parser.add_argument("--resolution", type=int, default=28, help="Image size in pixels.")
    parser.add_argument("--skip_bf16", action="store_true", help="Skip bf16 autocast (very slow without native bf16).")
    args = parser.parse_args()

    default = default_block_out_channels(args.resolution)
    wide = tuple(2 * width for width in default)
    configurations = [(f"default {default}, fp32", default, False), (f"wide {wide}, fp32", wide, False)]
    if not args.skip_bf16:
        configurations.append((f"default {default}, bf16 autocast", default, True))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_supports_bf16()}")  # fmt: skip

    results = []
    for name, channels, bf16 in configurations:
        rate = images_per_second(channels, args.resolution, args.batch_size, args.steps, bf16)
        results.append((name, rate))
        print(f"{name:45s} {rate:8.1f} images/s", flush=True)
    print("\nratios against the first line:")
    for name, rate in results:
        print(f"{name:45s} {rate / results[0][1]:6.2f}x")


if __name__ == "__main__":
    main()
