"""Resuming training: bit-for-bit equality with an uninterrupted run, kills during a checkpoint write, damaged
checkpoints, the checkpoint limit, and EMA weights swapped in and out around sampling and saving.

The runs use gradient accumulation over 2 micro-batches and a warm-up schedule. builtin:digits has 1,497 training
images, so batches of 64 give 23 micro-batches and 12 optimizer steps per epoch, the last one of a single
micro-batch. A 16-step run crosses an epoch boundary, and its checkpoints at steps 6 and 14 sit mid-epoch.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from training_helpers import (
    differences,
    python_command,
    read_checkpoint,
    run_main,
    subprocess_env,
    tiny_argv,
)

from diffusers_cfg.training import checkpoints, train_cfg
from diffusers_cfg.training.model import build_unet

MAX_STEPS = 16
RESUME_FLAGS = [
    "--max_train_steps", MAX_STEPS,
    "--gradient_accumulation_steps", 2,
    "--lr_scheduler", "cosine",
    "--checkpointing_steps", 2,
    "--checkpoints_total_limit", 20,
    "--ema_max_decay", 0.99,
]  # fmt: skip


class StopTraining(Exception):
    """Raised by a patched `checkpoints.save` to end a run right after a checkpoint, as a crash would."""


def stop_after_checkpoint(monkeypatch, step):
    save = checkpoints.save

    def save_then_stop(accelerator, output_dir, global_step, *args, **kwargs):
        path = save(accelerator, output_dir, global_step, *args, **kwargs)
        if global_step == step:
            raise StopTraining(path)
        return path

    monkeypatch.setattr(checkpoints, "save", save_then_stop)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 16-step run: its output folder."""
    output_dir = tmp_path_factory.mktemp("reference")
    run_main(tiny_argv(output_dir, *RESUME_FLAGS))
    return output_dir


def checkpoint(output_dir, step):
    return output_dir / "checkpoints" / f"checkpoint-{step}"


def assert_same_checkpoint(resumed_dir, reference_dir, step):
    resumed = read_checkpoint(checkpoint(resumed_dir, step))
    found = differences(resumed, read_checkpoint(checkpoint(reference_dir, step)))
    assert not found, f"checkpoint-{step} differs from the uninterrupted run's in: {found[:10]}"


def test_resume_matches_uninterrupted_run(reference, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "resumed"
    argv = tiny_argv(output_dir, *RESUME_FLAGS)

    # Stop mid-epoch 0, then mid-epoch 1 (after the epoch boundary at step 12), then finish.
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 6)
        with pytest.raises(StopTraining):
            run_main(argv)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 14)
        with pytest.raises(StopTraining):
            run_main([*argv, "--resume_from_checkpoint", "latest"])
    run_main([*argv, "--resume_from_checkpoint", "latest"])

    assert "Resumed from" in caplog.text
    assert "checkpoint-6 at step 6" in caplog.text
    assert "checkpoint-14 at step 14" in caplog.text
    for step in (8, 14, 16):
        assert_same_checkpoint(output_dir, reference, step)
    resumed_unet = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    reference_unet = load_file(reference / "unet" / "diffusion_pytorch_model.safetensors")
    assert not differences(resumed_unet, reference_unet), "the saved pipelines' UNet weights differ"


def test_counters_count_optimizer_steps(reference):
    names = sorted(os.listdir(reference / "checkpoints"), key=lambda name: int(name.split("-")[1]))
    assert names == [f"checkpoint-{step}" for step in range(2, MAX_STEPS + 1, 2)]

    state = read_checkpoint(checkpoint(reference, MAX_STEPS))
    assert state["global_step"] == MAX_STEPS
    assert state["ema"]["optimization_step"] == MAX_STEPS
    assert state["scheduler"]["last_epoch"] == MAX_STEPS  # one scheduler step per optimizer step on one process
    adam_steps = {float(param_state["step"]) for param_state in state["optimizer"]["state"].values()}
    assert adam_steps == {float(MAX_STEPS)}

    # Warm-up over 4 optimizer steps, then a cosine decay to zero at step 16.
    warming = read_checkpoint(checkpoint(reference, 2))["scheduler"]["_last_lr"][0]
    peak = read_checkpoint(checkpoint(reference, 4))["scheduler"]["_last_lr"][0]
    assert warming == pytest.approx(peak / 2)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


def test_finished_run_resumes_without_training(reference, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "finished"
    shutil.copytree(reference / "checkpoints", output_dir / "checkpoints")
    before = read_checkpoint(checkpoint(output_dir, MAX_STEPS))

    run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--resume_from_checkpoint", "latest"))

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    complete = [message for message in warnings if f"Training is already complete at step {MAX_STEPS}" in message]
    assert len(complete) == 1, warnings
    assert "nothing is left to train" in complete[0]
    assert caplog.text.count("left to train") == 1, "the finished run is reported more than once"
    assert not differences(read_checkpoint(checkpoint(output_dir, MAX_STEPS)), before)
    assert not (output_dir / "checkpoints" / f"checkpoint-{MAX_STEPS + 1}").exists()
    saved = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert not differences(saved, load_file(reference / "unet" / "diffusion_pytorch_model.safetensors"))


def folder_snapshot(folder) -> dict:
    """Map every file under `folder` to its size, modification time and SHA-256 digest."""
    snapshot = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            snapshot[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns, checkpoints._sha256(path))
    return snapshot


def fail_build_data(*args):
    raise AssertionError("the data were loaded before the checkpoint was rejected")


def test_resume_past_max_steps_fails_first(reference, tmp_path, monkeypatch):
    output_dir = tmp_path / "past"
    fill_checkpoints(output_dir, reference, (4, 8, 12))
    before = folder_snapshot(output_dir)
    monkeypatch.setattr(train_cfg, "build_data", fail_build_data)

    with pytest.raises(ValueError) as error:
        run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--max_train_steps", 10, "--resume_from_checkpoint", "latest"))

    message = str(error.value)
    assert "--max_train_steps 10 is below step 12 of" in message
    assert "checkpoint-12" in message
    assert "Give --max_train_steps 12 or more" in message
    assert "checkpoint-4, checkpoint-8)" in message
    assert folder_snapshot(output_dir) == before


def test_finished_run_dry_run_saves_nothing(reference, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "finished"
    shutil.copytree(reference / "checkpoints", output_dir / "checkpoints")
    run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--resume_from_checkpoint", "latest", "--dry_run"))
    assert "already complete" not in caplog.text, "a dry run reported that it saves the pipeline"
    assert not (output_dir / "model_index.json").exists()


def test_resume_with_other_model_fails_first(reference, tmp_path, caplog):
    # The checkpoint is at --max_train_steps: the run must not announce that it saves the pipeline, then fail.
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "reshaped"
    shutil.copytree(reference, output_dir)
    before = folder_snapshot(output_dir)

    with pytest.raises(ValueError) as error:
        run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--block_out_channels", 8, 32, "--prediction_type", "epsilon",
                           "--resume_from_checkpoint", "latest"))  # fmt: skip

    message = str(error.value)
    assert f"cannot resume from {checkpoint(output_dir, MAX_STEPS)}" in message
    assert "block_out_channels (--block_out_channels): checkpoint [8, 16], this run [8, 32]" in message
    assert "prediction_type (--prediction_type): checkpoint 'v_prediction', this run 'epsilon'" in message
    assert "layers_per_block" not in message
    assert checkpoints.SETTINGS_FILE in message
    assert folder_snapshot(output_dir) == before
    assert "already complete" not in caplog.text


def test_resume_checks_old_checkpoints_too(reference, tmp_path):
    # Checkpoints written before they recorded their settings: the output folder's training_config.json describes them.
    output_dir = tmp_path / "old"
    shutil.copytree(reference, output_dir)
    for folder in (output_dir / "checkpoints").iterdir():
        (folder / checkpoints.SETTINGS_FILE).unlink()
        state_path = folder / checkpoints.STATE_FILE
        state = json.loads(state_path.read_text())
        del state["files"][checkpoints.SETTINGS_FILE]
        state_path.write_text(json.dumps(state))
    before = folder_snapshot(output_dir)

    with pytest.raises(ValueError) as error:
        run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--layers_per_block", 2, "--attention_levels", 1,
                           "--resume_from_checkpoint", "latest"))  # fmt: skip

    message = str(error.value)
    assert "layers_per_block (--layers_per_block): checkpoint 1, this run 2" in message
    assert "attention_levels (--attention_levels): checkpoint [], this run [1]" in message
    assert str(output_dir / train_cfg.CONFIG_FILE) in message
    assert folder_snapshot(output_dir) == before


def test_checkpoints_record_resume_settings(reference):
    settings = checkpoints.read_settings(checkpoint(reference, 2))
    config = json.loads((reference / train_cfg.CONFIG_FILE).read_text())
    assert settings == train_cfg.resume_settings(config)
    assert set(settings) == set(train_cfg.RESUME_SETTINGS)
    assert settings["block_out_channels"] == [8, 16]


def test_saved_pipeline_holds_ema_weights(reference):
    state = read_checkpoint(checkpoint(reference, MAX_STEPS))
    pipeline_unet = UNet2DModel.from_pretrained(reference / "unet")
    names = [name for name, _ in pipeline_unet.named_parameters()]
    shadow = state["ema"]["shadow_params"]
    assert len(shadow) == len(names)
    for name, parameter, ema_value in zip(names, pipeline_unet.parameters(), shadow):
        assert parameter.dtype == torch.float32, name
        assert torch.equal(parameter.detach(), ema_value), f"{name} is not the EMA weight"
    # The training weights differ from their average, so the check above cannot pass by accident.
    assert any(not torch.equal(state["model"][name], ema_value) for name, ema_value in zip(names, shadow))


def test_ema_weights_swap_in_and_out():
    torch.manual_seed(0)
    unet = build_unet(8, 1, 10, (8, 16))
    ema = EMAModel(unet.parameters(), decay=0.9)
    for _ in range(3):  # diffusers' EMA copies the weights at its first step and averages from the second on
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.step(unet.parameters())
    training = [parameter.detach().clone() for parameter in unet.parameters()]
    assert all(not torch.equal(weight, average) for weight, average in zip(training, ema.shadow_params))
    unet.train()

    with train_cfg.EMAWeights(ema, unet) as swapped:
        assert not swapped.training
        for parameter, ema_value in zip(swapped.parameters(), ema.shadow_params):
            assert torch.equal(parameter, ema_value)
    assert unet.training
    for parameter, before in zip(unet.parameters(), training):
        assert torch.equal(parameter, before)

    with pytest.raises(RuntimeError, match="inside"), train_cfg.EMAWeights(ema, unet):
        raise RuntimeError("failure inside the block")
    for parameter, before in zip(unet.parameters(), training):
        assert torch.equal(parameter, before), "the training weights were not restored after an exception"


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """The reference run's flags plus sample grids every 4 steps, evaluations every 8, and TensorBoard logs."""
    output_dir = tmp_path_factory.mktemp("sampled")
    from diffusers_cfg.training.classifier import SampleClassifier

    # An untrained classifier of the real architecture: the logging path is under test, not the score.
    patch = pytest.MonkeyPatch()
    torch.manual_seed(0)
    untrained = (SampleClassifier(1, 10), {"dataset": "builtin:digits", "test_accuracy": 0.0})
    patch.setattr(train_cfg, "load_or_train_classifier", lambda data, *args: untrained)
    try:
        run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--sample_every_steps", 4, "--eval_every_steps", 8,
                           "--eval_samples_per_class", 1, "--report_to", "tensorboard"))  # fmt: skip
    finally:
        patch.undo()
    return output_dir


def test_sampling_leaves_training_unchanged(sampled_run, reference):
    assert sorted(os.listdir(sampled_run / "samples")) == [f"step-{step:06d}.png" for step in (4, 8, 12, 16)]
    for step in (8, MAX_STEPS):
        assert_same_checkpoint(sampled_run, reference, step)


def test_tensorboard_logs_scalars_and_grids(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_folder = sampled_run / "logs" / "train_cfg"
    event_files = [name for name in os.listdir(run_folder) if name.startswith("events.out.tfevents")]
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(run_folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("loss", "lr", "null_label_share", "images_per_second", "ema_decay", "class_accuracy/s=1",
                "class_accuracy/s=4"):  # fmt: skip
        assert tag in scalars, f"{tag} missing from {scalars}"
    assert [event.step for event in events.Scalars("loss")] == list(range(1, MAX_STEPS + 1))
    assert [event.step for event in events.Scalars("class_accuracy/s=4")] == [8, 16]
    shares = [event.value for event in events.Scalars("null_label_share")]
    assert all(0.0 <= share <= 0.4 for share in shares), shares
    assert 0.0 < sum(shares) / len(shares) < 0.25  # --cond_drop_prob 0.1 over 128 labels per step
    assert all(event.value > 0 for event in events.Scalars("images_per_second"))

    (image_tag,) = events.Tags()["images"]
    assert image_tag.startswith("samples/classes_by_guidance_scale")
    grids = events.Images(image_tag)
    assert [grid.step for grid in grids] == [4, 8, 12, 16]
    # 10 classes (rows) by the scales 0, 1 and 4 (columns) of 8x8 images
    assert (grids[0].height, grids[0].width) == (10 * 8, 3 * 8)


def fill_checkpoints(output_dir, reference, steps):
    for step in steps:
        shutil.copytree(checkpoint(reference, step), checkpoint(output_dir, step))


def test_truncated_checkpoint_falls_back(reference, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "truncated"
    fill_checkpoints(output_dir, reference, (12, 14))
    weights = checkpoint(output_dir, 14) / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)

    run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--resume_from_checkpoint", "latest"))

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("checkpoint-14" in message and "model.safetensors" in message for message in warnings), warnings
    assert "checkpoint-12 at step 12" in caplog.text
    assert_same_checkpoint(output_dir, reference, MAX_STEPS)


def test_altered_checkpoint_is_detected(reference, tmp_path, caplog):
    output_dir = tmp_path / "altered"
    fill_checkpoints(output_dir, reference, (12, 14))
    optimizer_file = checkpoint(output_dir, 14) / "optimizer.bin"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    optimizer_file.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        assert checkpoints.find_checkpoint(str(output_dir), "latest") == str(checkpoint(output_dir, 12))
    assert "optimizer.bin" in caplog.text
    assert "SHA-256" in caplog.text
    with pytest.raises(checkpoints.DamagedCheckpointError, match="checkpoint-14.*optimizer.bin"):
        checkpoints.find_checkpoint(str(output_dir), str(checkpoint(output_dir, 14)))

    (checkpoint(output_dir, 12) / "scheduler.bin").unlink()
    with pytest.raises(RuntimeError, match="every checkpoint .* is damaged"):
        checkpoints.find_checkpoint(str(output_dir), "latest")


def test_resume_targets(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert checkpoints.find_checkpoint(str(tmp_path), None) is None
    assert checkpoints.find_checkpoint(str(tmp_path), "latest") is None
    assert "No checkpoint found" in caplog.text
    assert "fresh run" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing-checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path), str(tmp_path / "missing-checkpoint"))

    # An unpublished folder does not count, even with a state file in it.
    partial = tmp_path / "checkpoints" / ".partial-checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "train_state.json").write_text(json.dumps({"global_step": 4, "files": {}}))
    assert checkpoints.find_checkpoint(str(tmp_path), "latest") is None


def test_missing_resume_path_fails_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cfg, "build_data", fail_build_data)
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        run_main(tiny_argv(tmp_path, "--resume_from_checkpoint", tmp_path / "no-such-checkpoint"))


def make_checkpoint_folders(output_dir, steps):
    for step in steps:
        folder = output_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "train_state.json").write_text(json.dumps({"global_step": step, "files": {}}))


def remaining(output_dir):
    return sorted(int(name.split("-")[1]) for name in os.listdir(output_dir / "checkpoints"))


@pytest.mark.parametrize(
    "steps, limit, keep, expected",
    [
        ([2, 4, 6, 8], 2, [], [6, 8]),
        ([2, 4, 6, 8], 2, [2, 8], [2, 8]),
        ([2, 4, 6, 8], 1, [2, 8], [2, 8]),  # the limit cannot be met without deleting a kept one
        ([2, 4], 3, [], [2, 4]),
    ],
)
def test_prune_spares_kept_checkpoints(tmp_path, steps, limit, keep, expected):
    make_checkpoint_folders(tmp_path, steps)
    kept = [str(tmp_path / "checkpoints" / f"checkpoint-{step}") for step in keep]
    checkpoints.prune(str(tmp_path), limit, keep=kept)
    assert remaining(tmp_path) == expected


def test_limit_never_deletes_resumed_checkpoint(reference, tmp_path):
    output_dir = tmp_path / "limited"
    fill_checkpoints(output_dir, reference, (4,))
    run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--checkpoints_total_limit", 1, "--resume_from_checkpoint",
                       "checkpoint-4"))  # fmt: skip
    assert remaining(output_dir) == [4, MAX_STEPS]
    assert_same_checkpoint(output_dir, reference, MAX_STEPS)


# A run that stalls at one point of writing checkpoint 8, so that the test can kill it there.
STALLING_RUN = """
import os, sys, time
from diffusers_cfg.training import checkpoints, train_cfg

def stall(name):
    open(os.environ["STALL_MARKER"], "w").close()
    time.sleep(600)

if os.environ["STALL_AT"] == "publish":
    publish = checkpoints._publish
    def stalled_publish(partial, final):
        if final.endswith("checkpoint-8"):
            stall("publish")
        publish(partial, final)
    checkpoints._publish = stalled_publish
else:
    # The generator is saved by a hook inside accelerate's save_state, before the model and optimizer files.
    save = train_cfg.TrainingGenerator.save
    def stalled_save(self, folder):
        save(self, folder)
        if folder.endswith("checkpoint-8"):
            stall("save_state")
    train_cfg.TrainingGenerator.save = stalled_save
train_cfg.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stall_at", ["save_state", "publish"])
def test_kill_during_checkpoint_write(reference, tmp_path, caplog, stall_at):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "killed"
    marker = tmp_path / "stalled"
    script = tmp_path / "stalling_run.py"
    script.write_text(STALLING_RUN)
    env = {**subprocess_env(tmp_path / "cache"), "STALL_AT": stall_at, "STALL_MARKER": str(marker)}
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(python_command(script, *tiny_argv(output_dir, *RESUME_FLAGS)), env=env,
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, f"the run ended before stalling:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach checkpoint 8 in time"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    partial = output_dir / "checkpoints" / ".partial-checkpoint-8"
    assert partial.is_dir()
    assert (partial / "train_state.json").is_file() == (stall_at == "publish")
    assert not checkpoint(output_dir, 8).exists()

    run_main(tiny_argv(output_dir, *RESUME_FLAGS, "--resume_from_checkpoint", "latest"))

    assert "checkpoint-6 at step 6" in caplog.text
    assert not partial.exists()
    assert_same_checkpoint(output_dir, reference, MAX_STEPS)
