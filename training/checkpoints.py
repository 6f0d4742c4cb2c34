"""Resumable training checkpoints: written atomically, validated on resume, pruned to a limit.

A checkpoint is `output_dir/checkpoints/checkpoint-<step>`, holding accelerate's state (model, optimizer,
learning-rate schedule, random states, and the EMA weights registered with it) and `train_state.json`. It is
written under a temporary name and renamed into place only when complete, so a run killed at any moment leaves
either a complete checkpoint or none under the final name.
"""

import json
import logging
import os
import re
import shutil

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
STATE_FILE = "train_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_FOLDER)


def complete_checkpoints(output_dir: str) -> list:
    """Paths of the checkpoints that finished writing, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def _fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())


def save(accelerator, output_dir: str, step: int, total_limit: int | None = None, keep: str | None = None) -> str:
    """Write checkpoint `step` atomically on every process, then prune old ones (never `keep`). Returns its path."""
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"checkpoint-{step}")
    partial = os.path.join(root, f".partial-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with open(os.path.join(partial, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({"global_step": step}, handle)
        _fsync_tree(partial)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info("Saved checkpoint %s", final)
        if total_limit is not None:
            prune(output_dir, total_limit, keep)
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: str, total_limit: int, keep: str | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `total_limit`, sparing `keep` (the one a run resumed from)."""
    existing = complete_checkpoints(output_dir)
    excess = len(existing) - total_limit
    for path in existing:
        if excess <= 0:
            break
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        shutil.rmtree(path, ignore_errors=True)
        excess -= 1


def read_step(path: str) -> int:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ValueError(f"checkpoint {path} is incomplete: it has no {STATE_FILE}")
    with open(state_path, encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


def resume(accelerator, output_dir: str, resume_from: str | None) -> tuple:
    """Load the requested checkpoint into the accelerator; return `(global_step, path)`, or `(0, None)` for a fresh start.

    `resume_from` is None (fresh start), "latest" (the newest loadable checkpoint in `output_dir`, falling back to
    older ones when the newest is damaged), or a checkpoint folder, which must exist.
    """
    if resume_from is None:
        return 0, None
    if resume_from != "latest":
        if not os.path.isdir(resume_from):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from!r} does not exist or is not a folder")
        step = read_step(resume_from)
        accelerator.load_state(resume_from)
        logger.info("Resumed from %s at step %d", resume_from, step)
        return step, resume_from

    candidates = complete_checkpoints(output_dir)
    if not candidates:
        logger.info("No checkpoint found in %s; starting a fresh run", checkpoints_root(output_dir))
        return 0, None
    for path in reversed(candidates):
        try:
            step = read_step(path)
            accelerator.load_state(path)
        except Exception as error:  # noqa: BLE001 - any failure to read a damaged checkpoint means "try an older one"
            logger.warning("Checkpoint %s cannot be loaded (%s: %s); trying an older one", path, type(error).__name__, error)
            continue
        logger.info("Resumed from %s at step %d", path, step)
        return step, path
    raise RuntimeError(f"none of the checkpoints in {checkpoints_root(output_dir)} could be loaded: {candidates}")
