"""Wall time of the default training command until its guided samples first reach a class accuracy (95% by default).

    python benchmarks/time_to_quality.py                           # builtin:mnist-5k with every default flag
    python benchmarks/time_to_quality.py --eval_every_steps 25 -- --learning_rate 3e-3

It runs `accelerate launch training/train_cfg.py` with the default flags, plus any flags given after `--`, and adds
--eval_every_steps, --eval_samples_per_class and --eval_guidance_scales. At every evaluation training logs the step,
the class accuracy and the seconds of training so far without the evaluations; this script reads that line. At the
first evaluation that reaches --target_accuracy it stops training, unless --run_to_end is given.

The accuracy is measured on 10 x --eval_samples_per_class samples: with 20 per class, its standard error near 95%
is about 1.5 points, so the step that first crosses the target varies from run to run.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from diffusers_cfg.training import train_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train_cfg.py"
# The line of train_cfg.log_class_accuracy, for example "Evaluation at step 50: class accuracy 31.0% at s = 4, after
# 61.2 s of training (evaluations excluded)".
EVALUATION_LINE = re.compile(r"Evaluation at step (\d+): class accuracy (.*), after ([0-9.]+) s of training")
ACCURACY = re.compile(r"([0-9.]+)% at s = ([0-9.eE+-]+)")


def parse_evaluation(line: str) -> dict | None:
    """Return the step, training seconds and {scale: accuracy} of an evaluation log line, or None for other lines."""
    match = EVALUATION_LINE.search(line)
    if match is None:
        return None
    accuracy = {float(scale): float(percent) / 100 for percent, scale in ACCURACY.findall(match.group(2))}
    return {"step": int(match.group(1)), "training_seconds": float(match.group(3)), "accuracy": accuracy}


def stop(process: subprocess.Popen) -> None:
    """Stop the launcher and the training process it started; both run in the process group started for them."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_training(command: list, args: argparse.Namespace) -> list:
    """Run the training command, echo its log (without progress bars) to stderr, and return its evaluations.

    Each evaluation also gets `wall_seconds`, the time from the launch to the moment its line was read.
    """
    evaluations = []
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        for line in process.stdout:
            if not line.startswith("training:"):  # tqdm's progress bar
                sys.stderr.write(line)
            evaluation = parse_evaluation(line)
            if evaluation is None:
                continue
            evaluation["wall_seconds"] = time.perf_counter() - started
            evaluations.append(evaluation)
            if reached(evaluation, args) and not args.run_to_end:
                stop(process)
                return evaluations
        process.wait()
    except BaseException:
        stop(process)
        raise
    if process.returncode != 0:
        raise SystemExit(f"error: training failed with exit code {process.returncode}; its log is above")
    return evaluations


def reached(evaluation: dict, args: argparse.Namespace) -> bool:
    return evaluation["accuracy"].get(args.guidance_scale, 0.0) >= args.target_accuracy


def parse_args(argv=None) -> tuple:
    """Return this script's flags and the training flags given after `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    training_flags = []
    if "--" in argv:
        split = argv.index("--")
        argv, training_flags = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target_accuracy", type=float, default=0.95, help="Class accuracy to reach, in [0, 1].")
    parser.add_argument("--guidance_scale", type=float, default=4.0,
                        help="Guidance scale s at which the accuracy is measured (w = s - 1).")
    parser.add_argument("--eval_every_steps", type=int, default=50, help="Optimizer steps between evaluations.")
    parser.add_argument("--eval_samples_per_class", type=int, default=20, help="Samples per class at each evaluation.")
    parser.add_argument("--run_to_end", action="store_true",
                        help="Train to --max_train_steps instead of stopping at the first evaluation that reaches "
                             "the target.")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0.0 <= args.target_accuracy <= 1.0:
        raise SystemExit(f"error: --target_accuracy must be in [0, 1], got {args.target_accuracy}")
    return args, training_flags


def main(argv=None) -> None:
    args, training_flags = parse_args(argv)
    evaluation_flags = ["--eval_every_steps", str(args.eval_every_steps), "--eval_samples_per_class",
                        str(args.eval_samples_per_class), "--eval_guidance_scales", str(args.guidance_scale)]  # fmt: skip
    with tempfile.TemporaryDirectory() as output_dir:
        # Flags given after `--` come last, so they win over these, as argparse keeps the last value.
        flags = ["--output_dir", output_dir, *evaluation_flags, *training_flags]
        config = train_cfg.parse_args(flags)  # rejects invalid flags before the launch
        command = [sys.executable, "-m", "accelerate.commands.launch", str(TRAIN_SCRIPT), *flags]
        print("running: accelerate launch training/train_cfg.py " + " ".join(flags), flush=True)
        evaluations = run_training(command, args)

    print(f"\n{'step':>6}  {'training s':>10}  {'wall s':>8}  accuracy at s = {args.guidance_scale:g}")
    for evaluation in evaluations:
        accuracy = evaluation["accuracy"].get(args.guidance_scale, float("nan"))
        print(f"{evaluation['step']:>6}  {evaluation['training_seconds']:>10.1f}  {evaluation['wall_seconds']:>8.1f}  "
              f"{100 * accuracy:.1f}%")  # fmt: skip
    target = f"{100 * args.target_accuracy:g}% class accuracy at s = {args.guidance_scale:g}"
    hit = next((evaluation for evaluation in evaluations if reached(evaluation, args)), None)
    if hit is None:
        best = max((evaluation["accuracy"].get(args.guidance_scale, 0.0) for evaluation in evaluations), default=0.0)
        print(f"\n{target} not reached in {config.max_train_steps} steps; the best evaluation scored {100 * best:.1f}%")
        ratios = [("best class accuracy / target", best / args.target_accuracy if args.target_accuracy else 1.0)]
    else:
        print(f"\n{target} first reached at step {hit['step']}: {hit['training_seconds']:.1f} s of training "
              f"(evaluations excluded), {hit['wall_seconds']:.1f} s from the launch (start-up and evaluations "
              "included)")  # fmt: skip
        ratios = [
            ("steps to target / --max_train_steps", hit["step"] / config.max_train_steps),
            ("training seconds to target / wall seconds to target", hit["training_seconds"] / hit["wall_seconds"]),
        ]
    harness.print_ratios(ratios, title="ratios, measured in this run")


if __name__ == "__main__":
    main()
