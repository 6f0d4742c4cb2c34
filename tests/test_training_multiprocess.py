"""Two training processes on the CPU under `accelerate launch`, talking over gloo on 127.0.0.1.

accelerate 1.16 starts a single process for a `distributed_type: MULTI_CPU` config unless the config names an
mpirun hostfile, so the command adds `--multi_gpu`, which starts the processes with torchrun. train_cfg.py requests
the CPU from accelerate when the machine has no accelerator device, and the processes then form a gloo group.
"""

import json
import os
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import REPO_ROOT, TRAIN_SCRIPT, subprocess_env, tiny_argv

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: 0
mixed_precision: 'no'
use_cpu: true
"""


def launch(tmp_path, output_dir, *flags, expect_success=True) -> str:
    """Run train_cfg.py in 2 processes and return their combined output."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(ACCELERATE_CONFIG)
    command = ["accelerate", "launch", "--config_file", str(config), "--multi_gpu", str(TRAIN_SCRIPT),
               *tiny_argv(output_dir, "--report_to", "tensorboard", "--checkpointing_steps", 2, *flags)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(tmp_path / "cache"), capture_output=True,
                            text=True, timeout=400, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_success, output[-4000:]
    return output


def event_files(output_dir) -> list:
    run_folder = output_dir / "logs" / "train_cfg"
    return sorted(name for name in os.listdir(run_folder) if name.startswith("events.out.tfevents"))


def logged_scalars(output_dir, tag) -> list:
    events = EventAccumulator(str(output_dir / "logs" / "train_cfg"), size_guidance={"scalars": 0})
    events.Reload()
    return sorted(events.Scalars(tag), key=lambda event: event.step)


def logged_loss_steps(output_dir) -> list:
    return [event.step for event in logged_scalars(output_dir, "loss")]


def logged_values(output_dir, tag) -> list:
    return [event.value for event in logged_scalars(output_dir, tag)]


def saved_checkpoint_lines(output: str) -> list:
    return [line.rsplit("/", 1)[-1] for line in output.splitlines() if "Saved checkpoint" in line]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    output_dir = tmp_path / "output"
    output = launch(tmp_path, output_dir, "--max_train_steps", 4)

    assert output.count("Training on builtin:digits") == 1, output[-4000:]
    assert "4 steps of 128 images" in output
    assert "2 process(es)" in output
    assert output.count("training:   0%") == 1, "more than one progress bar"
    assert saved_checkpoint_lines(output) == ["checkpoint-2", "checkpoint-4"]
    assert output.count("Saved the pipeline") == 1
    assert (output_dir / "model_index.json").is_file()

    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["num_processes"] == 2
    assert config["total_batch_size"] == 128
    assert len(event_files(output_dir)) == 1
    assert logged_loss_steps(output_dir) == [1, 2, 3, 4]
    # --learning_rate 2e-3 warmed up over 4 optimizer steps, as one process would log it
    assert logged_values(output_dir, "lr") == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])

    last = output_dir / "checkpoints" / "checkpoint-4"
    for name in ("random_states_0.pkl", "random_states_1.pkl", "training_generator_0.pt", "training_generator_1.pt"):
        assert (last / name).is_file(), f"{name} missing from {sorted(os.listdir(last))}"
    states = [torch.load(last / f"training_generator_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(*states), "both processes drew the same noise"

    output = launch(tmp_path, output_dir, "--max_train_steps", 6, "--resume_from_checkpoint", "latest")

    assert output.count("Resumed from") == 1, output[-4000:]
    assert "checkpoint-4 at step 4" in output, output[-4000:]
    assert "starting at step 4" in output
    assert saved_checkpoint_lines(output) == ["checkpoint-6"]
    assert output.count("Saved the pipeline") == 1
    assert len(event_files(output_dir)) == 2  # one per run, none per extra process
    assert logged_loss_steps(output_dir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_processes_stop_on_old_checkpoints(tmp_path):
    # Only the main process looks for checkpoints, and both processes must stop, neither waiting for the other.
    # Each process prints the error it raised.
    output_dir = tmp_path / "output"
    old = output_dir / "checkpoints" / "checkpoint-6"
    old.mkdir(parents=True)
    (old / "train_state.json").write_text(json.dumps({"global_step": 6, "files": {}}))

    output = launch(tmp_path, output_dir, "--max_train_steps", 2, expect_success=False)

    assert output.count("already contains checkpoints of an earlier run (checkpoint-6)") == 2, output[-4000:]
    assert "Training on" not in output
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["checkpoint-6"]
