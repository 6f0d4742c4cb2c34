"""What train_cfg.py checks and reports before the first training step: invalid sizes and datasets, the precision
fallback, the wandb flag, the saved configuration and --dry_run. The progress bar of a short run is checked too."""

import importlib.util
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import run_main, tiny_argv

from diffusers_cfg.training import train_cfg
from diffusers_cfg.training.model import (
    build_noise_scheduler,
    build_unet,
    check_resolution,
    default_block_out_channels,
)


@pytest.mark.parametrize(
    "resolution, levels, suggested",
    [(10, 3, "8 or 12"), (30, 3, "28 or 32"), (12, 4, "8 or 16"), (6, 4, "8")],
)
def test_check_resolution_suggests_sizes(resolution, levels, suggested):
    with pytest.raises(ValueError, match=f"--resolution {resolution} cannot be halved.*such as {suggested},"):
        check_resolution(resolution, levels)


def test_check_resolution_accepts_multiples():
    check_resolution(28, 3)
    check_resolution(32, 4)


def test_default_channels_reject_odd_halving():
    # 18 halves once to 9, which leaves a large image with too little depth.
    with pytest.raises(ValueError, match="such as 16 or 20"):
        default_block_out_channels(18)


def test_bad_resolution_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match="--resolution 10 .* such as 8 or 12"):
        run_main(tiny_argv(tmp_path, "--resolution", 10, "--block_out_channels", 8, 16, 32))
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / train_cfg.CONFIG_FILE).exists()


def test_missing_label_column_stops_before_training(tmp_path):
    # An imagefolder without class subfolders has no label column.
    images = tmp_path / "flat-images"
    images.mkdir()
    for index in range(4):
        Image.fromarray(np.full((8, 8), 40 * index, dtype=np.uint8)).save(images / f"{index}.png")
    output_dir = tmp_path / "output"
    with pytest.raises(ValueError, match="has no label column, because its images are not in class folders"):
        run_main(tiny_argv(output_dir, "--dataset_name", images, "--train_batch_size", 2))
    assert not output_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies to machines without a CUDA GPU")
def test_fp16_without_gpu_falls_back(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    run_main(tiny_argv(tmp_path, "--mixed_precision", "fp16", "--max_train_steps", 3, "--checkpointing_steps", 3))

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("--mixed_precision fp16 needs a CUDA GPU" in message for message in warnings), warnings
    config = json.loads((tmp_path / train_cfg.CONFIG_FILE).read_text())
    assert config["mixed_precision"] == "fp16"
    assert config["mixed_precision_resolved"] in ("no", "bf16")
    for path in (tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
                 tmp_path / "checkpoints" / "checkpoint-3" / "model.safetensors"):  # fmt: skip
        dtypes = {tensor.dtype for tensor in load_file(path).values()}
        assert dtypes == {torch.float32}, f"{path.name} holds {dtypes}"

    # The progress bar shows images per second and the time left as [elapsed<remaining].
    progress = capsys.readouterr().err
    assert re.search(r"img_s=\d+", progress), progress[-500:]
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", progress), progress[-500:]


def test_loss_is_fp32_under_autocast():
    torch.manual_seed(0)
    unet = build_unet(8, 1, 10, (8, 16))
    batch = {"pixel_values": torch.randn(4, 1, 8, 8), "class_labels": torch.tensor([0, 3, 5, 9])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = unet(batch["pixel_values"], torch.tensor([10, 200, 500, 900]), class_labels=batch["class_labels"])
        loss, _ = train_cfg.train_step(batch, unet, build_noise_scheduler(), 10, 0.1, "epsilon",
                                       torch.Generator().manual_seed(0))  # fmt: skip
    assert prediction.sample.dtype == torch.bfloat16  # autocast is active, so the fp32 loss below is a cast
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(parameter.dtype == torch.float32 for parameter in unet.parameters())


def test_wandb_flag(tmp_path):
    argv = tiny_argv(tmp_path, "--report_to", "wandb")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match="pip install wandb"):
            train_cfg.parse_args(argv)
    else:
        assert train_cfg.parse_args(argv).report_to == "wandb"


def test_config_saved_before_training(tmp_path, monkeypatch):
    class ReachedTraining(Exception):
        pass

    def check_config_then_stop(run, global_step):
        assert (tmp_path / train_cfg.CONFIG_FILE).is_file(), "training started before the configuration was saved"
        raise ReachedTraining

    monkeypatch.setattr(train_cfg, "train", check_config_then_stop)
    with pytest.raises(ReachedTraining):
        run_main(tiny_argv(tmp_path, "--gradient_accumulation_steps", 3))

    config = json.loads((tmp_path / train_cfg.CONFIG_FILE).read_text())
    assert config["dataset_name"] == "builtin:digits"
    assert (config["resolution"], config["channels"], config["num_classes"]) == (8, 1, 10)
    assert config["null_class_id"] == 10
    assert config["block_out_channels"] == [8, 16]
    assert config["total_batch_size"] == 64 * 3
    assert config["num_parameters"] == sum(p.numel() for p in build_unet(8, 1, 10, (8, 16)).parameters())


def test_dry_run_prints_config_and_stops(tmp_path, capsys):
    output_dir = tmp_path / "output"
    config = run_main(tiny_argv(output_dir, "--dry_run"))

    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert printed["num_parameters"] == config["num_parameters"] > 0
    assert printed["resolution"] == 8
    assert printed["mixed_precision_resolved"] in ("no", "bf16")
    assert f"UNet2DModel: {config['num_parameters']:,} parameters" in out
    assert "MiB in fp32" in out
    assert not output_dir.exists(), "--dry_run wrote to the output folder"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--cond_drop_prob", "1.0", "--cond_drop_prob must be in"),
        ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be at least 1"),
        ("--eval_every_steps", "-1", "--eval_every_steps must be at least 0"),
        ("--eval_every_steps", "5", "--eval_every_steps needs --eval_samples_per_class"),
    ],
)
def test_invalid_flags(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        train_cfg.parse_args(tiny_argv(tmp_path, flag, value))


def warnings_of(caplog) -> list:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lr_warmup_steps", 50, "--max_train_steps", 6], True),
        (["--lr_warmup_steps", 6, "--max_train_steps", 6], False),
        (["--lr_warmup_steps", 50, "--max_train_steps", 6, "--lr_scheduler", "constant"], False),
    ],
    ids=["longer", "equal", "constant-schedule"],
)
def test_warmup_longer_than_training_warns(tmp_path, caplog, flags, expected):
    caplog.set_level(logging.INFO)
    run_main(tiny_argv(tmp_path / "output", *flags, "--dry_run"))
    found = [message for message in warnings_of(caplog) if "--lr_warmup_steps" in message]
    if not expected:
        assert found == []
        return
    assert len(found) == 1, found
    assert "--lr_warmup_steps 50 exceeds --max_train_steps 6" in found[0]
    assert "never reaches its peak --learning_rate 0.002: it ends at 0.00024" in found[0]


def test_missing_dataset_names_flag(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(FileNotFoundError) as error:
        run_main(tiny_argv(tmp_path / "output", "--dataset_name", missing))
    message = str(error.value)
    assert message.startswith(f"--dataset_name '{missing}' is not an existing folder or file")
    assert "Couldn't find any data file" in message
    for accepted in ("Hub dataset id", "imagefolder", ".parquet", "builtin:digits", "builtin:mnist-5k",
                     "builtin:fashion-mnist"):  # fmt: skip
        assert accepted in message
