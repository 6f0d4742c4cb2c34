"""Checks of --output_dir at startup, before any data loads: a path that is a file or cannot be written, and a folder
that contains another run's checkpoints, which a new run would otherwise mix with its own."""

import json
import os

import pytest
from training_helpers import run_main, tiny_argv

from diffusers_cfg.training import checkpoints, train_cfg


def fail_build_data(*args):
    raise AssertionError("the data were loaded before --output_dir was checked")


@pytest.fixture
def no_data(monkeypatch):
    monkeypatch.setattr(train_cfg, "build_data", fail_build_data)


def make_checkpoint_folders(output_dir, steps):
    for step in steps:
        folder = output_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step, "files": {}}))


def checkpoint_steps(output_dir) -> list:
    return sorted(int(name.split("-")[1]) for name in os.listdir(output_dir / "checkpoints"))


@pytest.mark.parametrize("flags", [[], ["--dry_run"], ["--report_to", "tensorboard"]], ids=["run", "dry-run", "tb"])
def test_output_dir_that_is_file(tmp_path, no_data, flags):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=f"^--output_dir '{target}' is a file; give a folder path"):
        run_main(tiny_argv(target, *flags))
    assert target.read_text() == "not a folder"


def test_output_dir_inside_file(tmp_path, no_data):
    parent = tmp_path / "taken"
    parent.write_text("not a folder")
    with pytest.raises(ValueError, match=f"^--output_dir '{parent}/run' cannot be created, because '{parent}' is a file"):
        run_main(tiny_argv(parent / "run", "--dry_run"))


@pytest.mark.parametrize("missing", [False, True], ids=["existing", "to-create"])
def test_output_dir_not_writable(tmp_path, no_data, monkeypatch, missing):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        # Permission bits do not bind root, so the folder is reported read-only as on a read-only mount.
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: path != str(locked) and access(path, mode))
    output_dir = locked / "run" if missing else locked
    try:
        with pytest.raises(ValueError, match=f"^--output_dir '{output_dir}' is not writable") as error:
            run_main(tiny_argv(output_dir, "--dry_run"))
    finally:
        locked.chmod(0o755)
    if missing:
        assert f"it would be created in '{locked}'" in str(error.value)


@pytest.mark.parametrize("flags", [[], ["--dry_run"]], ids=["run", "dry-run"])
def test_new_run_rejects_old_checkpoints(tmp_path, no_data, flags):
    make_checkpoint_folders(tmp_path, (5, 6))
    with pytest.raises(ValueError) as error:
        run_main(tiny_argv(tmp_path, *flags))

    message = str(error.value)
    assert f"--output_dir '{tmp_path}' already contains checkpoints of an earlier run" in message
    assert "(checkpoint-5, checkpoint-6)" in message
    assert "--resume_from_checkpoint latest" in message
    assert "--overwrite_output_dir" in message
    assert "another --output_dir" in message
    assert checkpoint_steps(tmp_path) == [5, 6]


def test_output_dir_with_many_checkpoints(tmp_path):
    make_checkpoint_folders(tmp_path, range(1, 9))
    with pytest.raises(ValueError, match=r"\(8 checkpoints, up to checkpoint-8\)"):
        checkpoints.check_no_checkpoints(str(tmp_path))


class ReachedDataLoading(Exception):
    pass


def test_resume_passes_checkpoint_check(tmp_path, monkeypatch):
    make_checkpoint_folders(tmp_path, (5,))

    def stop(*args):
        raise ReachedDataLoading

    monkeypatch.setattr(train_cfg, "build_data", stop)
    with pytest.raises(ReachedDataLoading):
        run_main(tiny_argv(tmp_path, "--resume_from_checkpoint", "latest"))


def test_overwrite_output_dir_replaces_checkpoints(tmp_path):
    make_checkpoint_folders(tmp_path, (5, 6))
    run_main(tiny_argv(tmp_path, "--overwrite_output_dir", "--max_train_steps", 2, "--checkpointing_steps", 1,
                       "--checkpoints_total_limit", 2))  # fmt: skip

    assert checkpoint_steps(tmp_path) == [1, 2]
    assert checkpoints.find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoints" / "checkpoint-2")


def test_overwrite_output_dir_with_resume_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint"):
        train_cfg.parse_args(tiny_argv(tmp_path, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"))
