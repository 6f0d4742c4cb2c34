"""Flag checks of the training script that must fail before any data loads, and the secrets it must not write."""

import json

import pytest

from diffusers_cfg.training import train_cfg

TOKEN = "hf_secretsecretsecretsecretsecretsecret"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--guidance_scale", "nan"], "--guidance_scale"),
        (["--eval_guidance_scales", "1", "inf"], "--eval_guidance_scales"),
        (["--num_train_timesteps", "10"], "--num_inference_steps 50 exceeds --num_train_timesteps 10"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--max_grad_norm", "0"], "--max_grad_norm"),
        (["--adam_beta1", "2"], "--adam_beta1"),
        (["--ema_max_decay", "2"], "--ema_max_decay"),
        (["--layers_per_block", "0"], "--layers_per_block"),
        (["--block_out_channels", "0", "16"], "--block_out_channels"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_invalid_flag_is_rejected(flags, expected):
    with pytest.raises(ValueError) as error:
        train_cfg.parse_args(flags)
    assert expected in str(error.value)


def test_hub_token_never_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_CFG_KEEP_THREADS", "1")
    output_dir = tmp_path / "out"
    config = train_cfg.main([
        "--dataset_name", "builtin:digits", "--output_dir", str(output_dir), "--hub_token", TOKEN,
        "--report_to", "none", "--dry_run",
    ])  # fmt: skip

    assert "hub_token" not in config
    assert TOKEN not in json.dumps(config)
    assert TOKEN not in capsys.readouterr().out
