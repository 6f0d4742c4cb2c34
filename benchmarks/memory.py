"""Peak resident memory of training and sampling at default settings, against the reference loops.

    python benchmarks/memory.py
    python benchmarks/memory.py --device cuda --mixed_precision bf16 --sampling_mixed_precision bf16

Every workload runs in a fresh Python process, and this script reads the child's peak resident set size (RSS) from
the resource usage that os.wait4 returns, as /usr/bin/time does. All children import the same modules, so the
baseline shows the floor that imports and the default UNet take. Workloads:
- baseline: imports, builds the default UNet, and ends.
- training, default step: training's data loader and default step (see training_speed.py) for --train_steps steps.
- training, reference: the same data, then the reference loop of training_speed.py on one batch.
- sampling, pipeline: one ClassConditionalPipeline call on --sampling_batch_size images at s = 4, the batch that
  training's evaluation samples in.
- sampling, plain loop: the plain loop of sampling_speed.py with one batched 2B UNet call per step.
Sampling runs without gradients, so its peak comes within the first step and --sampling_steps can stay small. On a
CUDA device each child also reports torch.cuda.max_memory_allocated.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch

import harness
import sampling_speed
import training_speed
from diffusers_cfg.training.evaluation import autocast_context
from diffusers_cfg.training.model import build_unet

WORKLOADS = ["baseline", "training, default step", "training, reference", "sampling, pipeline", "sampling, plain loop"]
CUDA_PEAK_PREFIX = "cuda max allocated bytes:"


# Runs in a fresh Python process that imports nothing. It forks, the fork runs the command, and it writes the
# command's peak RSS (ru_maxrss of its resource usage) into the file named by its first argument. Linux keeps a
# process's peak across exec, so a command forked straight from this script would report at least this script's own
# peak. Forked from the small intermediate process, the command starts from a floor of a few MiB.
PEAK_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as handle:
    handle.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure_peak_rss(command: list) -> tuple:
    """Run `command` and return its peak RSS in bytes and its standard output; exit when it fails."""
    with tempfile.TemporaryDirectory() as folder:
        peak_path = os.path.join(folder, "peak")
        result = subprocess.run([sys.executable, "-I", "-c", PEAK_RSS_WRAPPER, peak_path, *command],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)} failed with exit code {result.returncode}")
        with open(peak_path, encoding="utf-8") as handle:
            peak = int(handle.read())
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return peak * scale, result.stdout


def run_workload(args: argparse.Namespace) -> None:
    """Run one workload in this process, and print the peak CUDA memory when it ran on a GPU."""
    device = harness.select_device(args.device)
    if args.workload == "baseline":
        build_unet(args.resolution, 1, args.num_classes, args.block_out_channels).to(device)
    elif args.workload.startswith("training"):
        with tempfile.TemporaryDirectory() as output_dir:
            setup = training_speed.TrainingSetup(args, output_dir)
            if args.workload == "training, default step":
                step, batches = setup.default_step(), setup.batches()
                for _ in range(args.train_steps):
                    step(next(batches))
            else:
                step = setup.reference_step()
                for _ in range(args.train_steps):
                    step(setup.fixed_batch)
    else:
        pipe = sampling_speed.load_pipeline(args, device)
        labels = torch.arange(args.sampling_batch_size, device=device) % pipe.num_classes
        generator = torch.Generator(device).manual_seed(0)
        if args.workload == "sampling, pipeline":
            with autocast_context(device, args.sampling_mixed_precision):
                pipe(class_labels=labels, guidance_scale=args.guidance_scale,
                     num_inference_steps=args.sampling_steps, generator=generator)  # fmt: skip
        else:
            sampling_speed.plain_guided_sampling(pipe.unet, pipe.scheduler, labels, args.guidance_scale,
                                                 args.sampling_steps, generator)  # fmt: skip
    if device.type == "cuda":
        print(f"{CUDA_PEAK_PREFIX} {torch.cuda.max_memory_allocated(device)}")


def child_flags(args: argparse.Namespace) -> list:
    """Return the flags that pass this run's settings on to a child process."""
    flags = []
    for name in ("device", "dataset_name", "train_batch_size", "train_steps", "mixed_precision", "pipeline_dir",
                 "resolution", "num_classes", "sampling_batch_size", "sampling_steps", "sampling_mixed_precision",
                 "guidance_scale"):  # fmt: skip
        flags += [f"--{name}", str(getattr(args, name))]
    if args.block_out_channels:
        flags += ["--block_out_channels", *map(str, args.block_out_channels)]
    return flags


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default=None,
                        help="Run this one workload in this process (what the children run).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="Where to run: auto picks the CUDA GPU when torch finds one, else the CPU.")
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                        help="UNet channels per block; training's default for the resolution when omitted.")
    training = parser.add_argument_group("training")
    training.add_argument("--dataset_name", default=training_speed.train_cfg.DEFAULT_DATASET,
                          help="Dataset, as training's flag.")
    training.add_argument("--train_batch_size", type=int, default=128, help="Images per step, as training's flag.")
    training.add_argument("--train_steps", type=int, default=3, help="Training steps per training workload.")
    training.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                          help="Training's --mixed_precision for the default step; the reference is fp32.")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--pipeline_dir", default="cfg-mnist",
                          help="Saved pipeline to sample; a random default UNet when it is missing.")
    sampling.add_argument("--resolution", type=int, default=28, help="Image size of the random UNet (no pipeline).")
    sampling.add_argument("--num_classes", type=int, default=10, help="Classes of the random UNet (no pipeline).")
    sampling.add_argument("--sampling_batch_size", type=int, default=250, help="Images per sampling call.")
    sampling.add_argument("--sampling_steps", type=int, default=5, help="Sampling steps per call.")
    sampling.add_argument("--sampling_mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                          help="Autocast around the pipeline call; the plain loop is fp32.")
    sampling.add_argument("--guidance_scale", type=float, default=4.0, help="Guidance scale s (w = s - 1).")
    args = parser.parse_args(argv)
    harness.check_positive(args, ["train_batch_size", "train_steps", "sampling_batch_size", "sampling_steps"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.workload is not None:
        run_workload(args)
        return

    device = harness.select_device(args.device)
    print(harness.describe_machine(device))
    print(f"training: {args.dataset_name}, batch {args.train_batch_size}, {args.train_steps} steps; sampling: "
          f"{args.sampling_batch_size} images, {args.sampling_steps} steps, pipeline {args.pipeline_dir}"
          f"{'' if os.path.isdir(args.pipeline_dir) else ' (missing: a random default UNet)'}\n", flush=True)  # fmt: skip
    peaks, cuda_peaks = {}, {}
    for workload in WORKLOADS:
        command = [sys.executable, os.path.abspath(__file__), "--workload", workload, *child_flags(args)]
        peaks[workload], output = measure_peak_rss(command)
        line = f"{workload:<24s} peak RSS {peaks[workload] / 2**20:8.1f} MiB"
        for text in output.splitlines():
            if text.startswith(CUDA_PEAK_PREFIX):
                cuda_peaks[workload] = int(text[len(CUDA_PEAK_PREFIX) :])
                line += f", CUDA max allocated {cuda_peaks[workload] / 2**20:8.1f} MiB"
        print(line, flush=True)

    baseline = peaks["baseline"]
    ratios = []
    for project, reference in (("training, default step", "training, reference"),
                               ("sampling, pipeline", "sampling, plain loop")):  # fmt: skip
        ratios.append((f"peak RSS, {project} / {reference}", peaks[project] / peaks[reference]))
        above_reference = peaks[reference] - baseline
        if above_reference > 0:
            ratios.append((f"peak RSS above baseline, {project} / {reference}",
                           (peaks[project] - baseline) / above_reference))  # fmt: skip
        if project in cuda_peaks and cuda_peaks.get(reference):
            ratios.append((f"CUDA max allocated, {project} / {reference}", cuda_peaks[project] / cuda_peaks[reference]))
    harness.print_ratios(ratios)


if __name__ == "__main__":
    main()
