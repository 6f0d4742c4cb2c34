"""Shared parts of the benchmark scripts: device choice, interleaved timing, and the report.

Each script times its variants in rounds: every variant runs in turn, and the order shifts by one each round, so a
change of machine load during the run (another process starting, a CPU clocking down) reaches every variant alike.
The median time of a unit of work (a training step, a sampling run) gives the rate. The ratios come last, one per
line, as `ratio: <what> = <value>`.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from diffusers_cfg.training.evaluation import cpu_supports_bf16

RATIO_PREFIX = "ratio:"


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --device and the flags that add torch.compile and channels_last variants."""
    group = parser.add_argument_group("device and extra variants")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="Where to run: auto picks the CUDA GPU when torch finds one, else the CPU.")
    group.add_argument("--compile", action="store_true",
                       help="Add a variant of the project's code whose UNet runs through torch.compile.")
    group.add_argument("--compile_backend", default="inductor",
                       help="torch.compile backend for --compile; 'eager' runs the compile code path without "
                            "generating code, which the fast tests use.")
    group.add_argument("--channels_last", action="store_true",
                       help="Add a variant of the project's code whose UNet weights use the channels_last memory "
                            "format.")  # fmt: skip


def add_timing_arguments(parser: argparse.ArgumentParser, rounds: int, repeats: int, warmup: int) -> None:
    group = parser.add_argument_group("timing")
    group.add_argument("--rounds", type=int, default=rounds, help="Rounds in which every variant runs in turn.")
    group.add_argument("--repeats", type=int, default=repeats, help="Timed units of work per variant and round.")
    group.add_argument("--warmup", type=int, default=warmup,
                       help="Untimed units of work per variant before the first round (allocators, kernel choice, "
                            "torch.compile).")  # fmt: skip


def check_positive(args: argparse.Namespace, names: list) -> None:
    """Exit with an error naming the flag when one of `names` is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}")


def select_device(name: str) -> torch.device:
    """Return the device for --device: "auto" is the CUDA GPU when torch finds one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU, and torch finds none; use --device cpu or auto")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock reads the end of the work and not of its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_machine(device: torch.device) -> str:
    """Describe what the timings depend on: versions, device, threads, CPU features and the machine's load."""
    lines = [
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native CPU bf16: {cpu_supports_bf16()}"
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        # Other processes on the same cores distort every figure; the load average shows whether there were any.
        lines.append(f"load average over the last minute: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
                     "(this process included)")  # fmt: skip
    return "\n".join(lines)


@dataclasses.dataclass
class Variant:
    """One way of doing the measured work: `run()` does one unit of it, on `images` images."""

    name: str
    run: Callable[[], object]
    images: int
    seconds: list = dataclasses.field(default_factory=list)

    def images_per_second(self) -> float:
        return self.images / statistics.median(self.seconds)


def time_interleaved(variants: list, rounds: int, repeats: int, warmup: int, device: torch.device) -> None:
    """Run every variant `warmup` times untimed, then time `repeats` units of each per round, in shifting order."""
    for variant in variants:
        for _ in range(warmup):
            variant.run()
    synchronize(device)
    for round_index in range(rounds):
        print(f"round {round_index + 1} of {rounds}", file=sys.stderr, flush=True)
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            for _ in range(repeats):
                start = time.perf_counter()
                variant.run()
                synchronize(device)
                variant.seconds.append(time.perf_counter() - start)


def print_rates(variants: list) -> None:
    """Print each variant's median rate in images per second, and the range of its timed units."""
    width = max(len(variant.name) for variant in variants)
    for variant in variants:
        rates = [variant.images / seconds for seconds in variant.seconds]
        print(f"{variant.name:<{width}}  {variant.images_per_second():9.2f} images/s  (range {min(rates):.2f} to "
              f"{max(rates):.2f} over {len(rates)} timed units)")  # fmt: skip


def print_ratios(ratios: list, title: str = "ratios, measured side by side in this run") -> None:
    """Print `(label, value)` pairs as the report's last lines."""
    print(f"\n{title}:")
    for label, value in ratios:
        print(f"{RATIO_PREFIX} {label} = {value:.3f}")
