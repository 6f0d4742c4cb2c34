"""Helpers for the training tests: tiny runs of `train_cfg.main`, in this process or in a new one, and readers that
load a checkpoint's state for comparison."""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from diffusers_cfg.training import train_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train_cfg.py"

# A UNet of about 40k parameters on the 8x8 digits: one optimizer step takes tens of milliseconds on one core.
TINY_FLAGS = [
    "--dataset_name", "builtin:digits",
    "--block_out_channels", "8", "16",
    "--train_batch_size", "64",
    "--lr_warmup_steps", "4",
    "--num_inference_steps", "2",
    "--eval_samples_per_class", "0",
    "--sample_every_steps", "0",
    "--report_to", "none",
]  # fmt: skip


def tiny_argv(output_dir, *flags) -> list:
    """Return the flags of a tiny run into `output_dir`. Later `flags` override the defaults, because argparse keeps
    the last value."""
    return [*TINY_FLAGS, "--output_dir", str(output_dir), *map(str, flags)]


def run_main(argv):
    """Run `train_cfg.main(argv)` in this process on one CPU thread, then reset accelerate's process-wide state.

    One thread keeps runs bit-for-bit comparable (a reduction's summation order can depend on the thread count) and
    fast on shared cores. accelerate keeps its state in class attributes, which the next run in this process must
    not inherit.
    """
    threads = torch.get_num_threads()
    keep_threads = os.environ.get("DIFFUSERS_CFG_KEEP_THREADS")
    os.environ["DIFFUSERS_CFG_KEEP_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        return train_cfg.main(list(argv))
    finally:
        torch.set_num_threads(threads)
        if keep_threads is None:
            os.environ.pop("DIFFUSERS_CFG_KEEP_THREADS", None)
        else:
            os.environ["DIFFUSERS_CFG_KEEP_THREADS"] = keep_threads
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def subprocess_env(cache_dir) -> dict:
    """Return the environment of a training subprocess: one thread, offline Hub clients, the classifier cache in
    `cache_dir`."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DIFFUSERS_CFG_KEEP_THREADS": "1",
        "DIFFUSERS_CFG_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # gloo otherwise picks the interface of the host name, which need not be the loopback one.
        "GLOO_SOCKET_IFNAME": "lo",
    }


def python_command(*args) -> list:
    return [sys.executable, *map(str, args)]


def read_checkpoint(path) -> dict:
    """Load what a checkpoint contains for training, for comparison: weights, EMA, optimizer, schedule, step, and the
    training generators.

    Left out: accelerate's `random_states_*.pkl`, the global generators of Python, NumPy and torch, which training
    does not draw from (an interrupted run's Python state differs), and the file digests of `train_state.json`,
    which cover those files.
    """
    path = Path(path)
    state = {
        "model": load_file(path / "model.safetensors"),
        "optimizer": torch.load(path / "optimizer.bin", weights_only=False),
        "scheduler": torch.load(path / "scheduler.bin", weights_only=False),
        "global_step": json.loads((path / "train_state.json").read_text())["global_step"],
    }
    if (path / "custom_checkpoint_0.pkl").is_file():
        state["ema"] = torch.load(path / "custom_checkpoint_0.pkl", weights_only=False)
    for generator_file in sorted(path.glob("training_generator_*.pt")):
        state[generator_file.stem] = torch.load(generator_file, weights_only=True)
    return state


def differences(left, right, where="") -> list:
    """List the places where two nested states differ, bit for bit for tensors. The list is empty when they are
    identical."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        same = (
            isinstance(left, torch.Tensor)
            and isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and left.shape == right.shape
            and torch.equal(left, right)
        )
        return [] if same else [where or "tensor"]
    if isinstance(left, dict) and isinstance(right, dict):
        if set(left) != set(right):
            return [f"{where}: keys {sorted(map(str, set(left) ^ set(right)))}"]
        return [found for key in left for found in differences(left[key], right[key], f"{where}/{key}")]
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        if len(left) != len(right):
            return [f"{where}: length {len(left)} != {len(right)}"]
        return [found for i, (a, b) in enumerate(zip(left, right)) for found in differences(a, b, f"{where}[{i}]")]
    return [] if left == right else [f"{where}: {left!r} != {right!r}"]
