"""Checks that every console script shares: each is tested, and each rejects a read-only output folder before it
loads a model."""

import json
import subprocess
import sys
from importlib.metadata import distribution

import pytest
from command_helpers import CONSOLE_SCRIPTS, script_env, without_write_override

from pipeline_helpers import tiny_pipeline

# Runs in a child process that cannot write into read-only folders. It calls each command and prints the message
# of the SystemExit that each one raises, or "no error".
CHILD = """
import json, sys
from diffusers_cfg.pipelines import sample
from diffusers_cfg.training import compare_sweeps, guidance_sweep

commands = json.loads(sys.argv[1])
messages = {}
for name, (module, argv) in commands.items():
    try:
        {"sample": sample, "sweep": guidance_sweep, "compare": compare_sweeps}[module].main(argv)
        messages[name] = "no error"
    except SystemExit as error:
        messages[name] = str(error)
print(json.dumps(messages))
"""


def test_every_console_script_is_listed():
    scripts = {entry.name: entry.value for entry in distribution("diffusers-cfg").entry_points
               if entry.group == "console_scripts"}  # fmt: skip
    assert scripts == {name: f"{module}:{function}" for name, (module, function) in CONSOLE_SCRIPTS.items()}


@pytest.fixture(scope="module")
def read_only_messages(tmp_path_factory):
    """Run each command against read-only folders in one child process; return its messages by case."""
    root = tmp_path_factory.mktemp("read-only")
    pipeline_dir = root / "pipe"
    tiny_pipeline().save_pretrained(pipeline_dir)
    (pipeline_dir / "training_config.json").write_text(json.dumps({"dataset_name": "builtin:digits"}))
    sweep_dir = root / "sweep"
    sweep_dir.mkdir()
    locked = root / "locked"
    locked.mkdir()
    commands = {
        "sample --output": ("sample", [str(pipeline_dir), "--output", str(locked / "grid.png")]),
        "sweep --output_dir": ("sweep", [str(pipeline_dir), "--output_dir", str(locked / "sweep")]),
        "sweep --set_default": ("sweep", [str(pipeline_dir), "--output_dir", str(root / "out"), "--set_default", "fid"]),
        "compare --output_dir": ("compare", [str(sweep_dir), "--output_dir", str(locked / "comparison")]),
    }
    locked.chmod(0o555)
    pipeline_dir.chmod(0o555)
    try:
        result = subprocess.run([*without_write_override(), sys.executable, "-c", CHILD, json.dumps(commands)],
                                capture_output=True, text=True, timeout=120, env=script_env(), check=False)  # fmt: skip
    finally:
        locked.chmod(0o755)
        pipeline_dir.chmod(0o755)
    assert result.returncode == 0, result.stderr
    return {"messages": json.loads(result.stdout), "root": root}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("sample --output", "error: --output '{root}/locked/grid.png' is not writable: '{root}/locked' does not"),
        ("sweep --output_dir", "error: --output_dir '{root}/locked/sweep' is not writable"),
        ("sweep --set_default", ("error: --set_default needs to write model_index.json in PIPELINE_DIR '{root}/pipe', "
                                 "but the folder is not writable")),
        ("compare --output_dir", "error: --output_dir '{root}/locked/comparison' is not writable"),
    ],
)  # fmt: skip
def test_read_only_folder_fails_first(read_only_messages, case, expected):
    root = read_only_messages["root"]
    assert read_only_messages["messages"][case].startswith(expected.format(root=root))
    assert not (root / "out").exists(), "the sweep wrote reports before it rejected --set_default"
