"""Resumable training checkpoints: written atomically, verified on resume, pruned to a limit.

A checkpoint is the folder `output_dir/checkpoints/checkpoint-<step>`, where <step> counts optimizer steps. It contains
accelerate's state (model, optimizer, learning-rate schedule, random states, the objects registered for
checkpointing such as the EMA weights, and whatever the accelerator's save hooks write), `training_settings.json`
with the settings a resumed run must share (see `record_settings`), and `train_state.json`, which records the step and
the size and SHA-256 digest of every other file.

The folder is written as `.partial-checkpoint-<step>` and renamed into place only when complete, so a run killed at
any moment leaves either a complete checkpoint or none under the final name. Resuming checks every file against
`train_state.json`, so a truncated or altered checkpoint is reported by name and an older one is used.

All processes of a run must see the same output folder: one machine, or a filesystem shared by all machines.
"""

import hashlib
import json
import logging
import os
import re
import shutil

from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
STATE_FILE = "train_state.json"
SETTINGS_FILE = "training_settings.json"
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class DamagedCheckpointError(ValueError):
    """A checkpoint folder whose files do not match its `train_state.json`, or that has none."""


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_FOLDER)


def complete_checkpoints(output_dir: str) -> list:
    """Paths of the checkpoint folders that have a `train_state.json`, oldest step first.

    Having the state file means the folder was renamed into place after a complete write; `verify` checks its files.
    """
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _list_files(folder: str) -> list:
    """Paths of the files under `folder`, relative to it, with "/" separators, sorted."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            found.append(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/"))
    return sorted(found)


def _fsync(path: str) -> None:
    """Flush a file or folder to disk, so that a rename after it cannot be seen before the data."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # Windows cannot open folders; its renames are not ordered after data anyway.
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_state_file(folder: str, step: int) -> None:
    """Record the step and the size and digest of every file in `folder`, then flush everything to disk."""
    files = {}
    for relative in _list_files(folder):
        if relative == STATE_FILE:
            continue
        path = os.path.join(folder, relative)
        _fsync(path)
        files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    state_path = os.path.join(folder, STATE_FILE)
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump({"global_step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(folder)


def _publish(partial: str, final: str) -> None:
    """Rename the finished `partial` folder to `final`, replacing an older folder of that name."""
    root = os.path.dirname(final)
    if os.path.isdir(final):
        # Renamed away first, so that a kill in between leaves no half-deleted folder under the final name.
        stale = os.path.join(root, DELETING_PREFIX + os.path.basename(final))
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync(root)


def save(accelerator, output_dir: str, step: int, total_limit: int | None = None, keep: str | None = None) -> str:
    """Write checkpoint `step` on every process, publish it atomically, then prune old ones. Returns its path.

    Pruning never deletes `keep` (the checkpoint the run resumed from) or the checkpoint just written.
    """
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"checkpoint-{step}")
    partial = os.path.join(root, f"{PARTIAL_PREFIX}checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _write_state_file(partial, step)
        _publish(partial, final)
        logger.info("Saved checkpoint %s", final)
        if total_limit is not None:
            prune(output_dir, total_limit, keep=[path for path in (keep, final) if path])
    accelerator.wait_for_everyone()
    return final


def _delete(path: str) -> None:
    """Delete a checkpoint folder, renaming it first so that a kill mid-way leaves no damaged checkpoint behind."""
    doomed = os.path.join(os.path.dirname(path), DELETING_PREFIX + os.path.basename(path))
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(output_dir: str, total_limit: int, keep=()) -> list:
    """Delete the oldest checkpoints until at most `total_limit` remain, never one in `keep`.

    Returns the deleted paths.

    Checkpoints in `keep` count toward the limit but are never deleted, so more than `total_limit` remain when
    deleting all the others is not enough.
    """
    if isinstance(keep, str):
        keep = [keep]
    kept = {os.path.abspath(path) for path in keep}
    existing = complete_checkpoints(output_dir)
    excess = len(existing) - total_limit
    deleted = []
    for path in existing:
        if excess <= 0:
            break
        if os.path.abspath(path) in kept:
            continue
        _delete(path)
        deleted.append(path)
        excess -= 1
    if deleted:
        logger.info("Deleted %d old checkpoint(s) beyond --checkpoints_total_limit %d: %s", len(deleted), total_limit,
                    ", ".join(os.path.basename(path) for path in deleted))  # fmt: skip
    return deleted


def remove_unfinished(output_dir: str) -> list:
    """Delete the `.partial-*` and `.deleting-*` folders that a killed run left behind. Returns their paths."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(name for name in os.listdir(root) if name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)))
    leftovers = [os.path.join(root, name) for name in names]
    for path in leftovers:
        logger.info("Deleting %s, left unfinished by an earlier run", path)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def verify(path: str) -> int:
    """Check every file of checkpoint `path` against its `train_state.json` and return its step.

    Raises `DamagedCheckpointError`, naming the checkpoint and the file, when the state file is missing or unreadable,
    or a file is missing, has another size, or has another SHA-256 digest.
    """
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise DamagedCheckpointError(f"checkpoint {path} is incomplete: it has no {STATE_FILE}")
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        step = int(state["global_step"])
        files = dict(state["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpointError(f"checkpoint {path} has an unreadable {STATE_FILE}: {error}") from error
    for relative, expected in files.items():
        file_path = os.path.join(path, relative)
        if not os.path.isfile(file_path):
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {relative} is missing")
        size = os.path.getsize(file_path)
        if size != expected["size"]:
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged: {relative} has {size} bytes, {STATE_FILE} records {expected['size']}"
            )
        if _sha256(file_path) != expected["sha256"]:
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged: the SHA-256 digest of {relative} differs from the one in {STATE_FILE}"
            )
    return step


def find_checkpoint(output_dir: str, resume_from: str | None) -> str | None:
    """Pick the checkpoint to resume from and check its files. Returns its path, or None for a fresh start.

    `resume_from` is None (a fresh start), a checkpoint folder, the name of a folder in `output_dir/checkpoints`, or
    "latest". "latest" picks the newest intact checkpoint in `output_dir` and warns about each damaged newer one. When
    there is no checkpoint at all, it means a fresh start.

    Raises `FileNotFoundError` for a folder that does not exist, `DamagedCheckpointError` for a damaged one, and
    `RuntimeError` when "latest" finds only damaged checkpoints.
    """
    if resume_from is None:
        return None
    root = checkpoints_root(output_dir)
    if resume_from != "latest":
        path = resume_from
        if not os.path.isdir(path) and os.path.isdir(os.path.join(root, resume_from)):
            path = os.path.join(root, resume_from)
        if not os.path.isdir(path):
            names = [os.path.basename(found) for found in complete_checkpoints(output_dir)]
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume_from!r} is not a folder, nor a checkpoint in {root} (found: "
                f"{', '.join(names) or 'none'}); give 'latest', a checkpoint folder, or the name of one"
            )
        verify(path)
        return path

    candidates = complete_checkpoints(output_dir)
    if not candidates:
        logger.info("No checkpoint found in %s; starting a fresh run from step 0", root)
        return None
    for path in reversed(candidates):
        try:
            verify(path)
        except DamagedCheckpointError as error:
            logger.warning("%s; trying an older checkpoint", error)
            continue
        return path
    raise RuntimeError(
        f"every checkpoint in {root} is damaged ({', '.join(os.path.basename(path) for path in candidates)}); "
        "delete them, or leave out --resume_from_checkpoint to start a fresh run"
    )


def decide_on_main_process(accelerator, function, *args):
    """Call `function(*args)` on the main process only and return its result on every process.

    An OSError, RuntimeError or ValueError that it raises is sent to every process and raised there, so all of them
    stop together.
    """
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = function(*args)
        except (OSError, RuntimeError, ValueError) as error:
            outcome[1] = error
    outcome = broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def select(accelerator, output_dir: str, resume_from: str | None) -> str | None:
    """Run `find_checkpoint` on the main process and broadcast its result, so that every process loads the same one."""
    return decide_on_main_process(accelerator, find_checkpoint, output_dir, resume_from)


def check_no_checkpoints(output_dir: str) -> None:
    """Raise a ValueError when `output_dir` contains checkpoints, for a run that starts at step 0.

    A new run there numbers its checkpoints from the start, so pruning to --checkpoints_total_limit deletes its own
    checkpoints (the lowest steps) and keeps the earlier run's, which `--resume_from_checkpoint latest` then picks.
    """
    existing = [os.path.basename(path) for path in complete_checkpoints(output_dir)]
    if not existing:
        return
    listed = ", ".join(existing) if len(existing) <= 5 else f"{len(existing)} checkpoints, up to {existing[-1]}"
    raise ValueError(
        f"--output_dir {output_dir!r} already contains checkpoints of an earlier run ({listed}), and a new run would "
        "mix its checkpoints with them. Continue that run with --resume_from_checkpoint latest, delete "
        f"{checkpoints_root(output_dir)!r}, pass --overwrite_output_dir to delete its checkpoints and start over, or "
        "choose another --output_dir"
    )


def delete_all(output_dir: str) -> list:
    """Delete every complete checkpoint in `output_dir`, for a new run that replaces an earlier one. Returns their
    paths."""
    existing = complete_checkpoints(output_dir)
    for path in existing:
        _delete(path)
    if existing:
        logger.info("Deleted %d checkpoint(s) of an earlier run (--overwrite_output_dir): %s", len(existing),
                    ", ".join(os.path.basename(path) for path in existing))  # fmt: skip
    return existing


def load(accelerator, output_dir: str, path: str | None) -> int:
    """Load checkpoint `path` (chosen by `select`) into the accelerator and return its step; 0 when `path` is None.

    Also deletes the unfinished folders that a killed run left in `output_dir/checkpoints`.
    """
    if accelerator.is_main_process:
        remove_unfinished(output_dir)
    accelerator.wait_for_everyone()
    if path is None:
        return 0
    step = step_of(path)
    accelerator.load_state(path)
    logger.info("Resumed from %s at step %d", path, step)
    return step


def step_of(path: str) -> int:
    """Return the optimizer step that checkpoint `path` records in its `train_state.json`."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


def record_settings(accelerator, settings: dict) -> None:
    """Write `settings` into every checkpoint that `accelerator` saves from now on, as `training_settings.json`.

    A resumed run reads them back with `read_settings` and compares them with its own before loading anything. Only
    the main process writes the file. The file is written before `train_state.json`, which then covers it.
    """

    def write(models, weights, folder):
        if accelerator.is_main_process:
            with open(os.path.join(folder, SETTINGS_FILE), "w", encoding="utf-8") as handle:
                json.dump(settings, handle, indent=1, sort_keys=True)

    accelerator.register_save_state_pre_hook(write)


def read_settings(path: str) -> dict | None:
    """Return the settings recorded in checkpoint `path`, or None when it has none (checkpoints written before
    `record_settings` existed)."""
    settings_path = os.path.join(path, SETTINGS_FILE)
    if not os.path.isfile(settings_path):
        return None
    with open(settings_path, encoding="utf-8") as handle:
        return json.load(handle)
