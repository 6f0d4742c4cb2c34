"""Helpers for the tests of the console scripts: run one the way its installed wrapper does, as a user without write
access to read-only folders."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Script name -> (module, function) as setup.py's console_scripts declare them.
CONSOLE_SCRIPTS = {
    "diffusers-cfg-sample": ("diffusers_cfg.pipelines.sample", "main"),
    "diffusers-cfg-push": ("diffusers_cfg.training.hub", "main"),
    "diffusers-cfg-sweep": ("diffusers_cfg.training.guidance_sweep", "main"),
    "diffusers-cfg-compare-sweeps": ("diffusers_cfg.training.compare_sweeps", "main"),
}


def script_env(**extra: str) -> dict:
    """Return the environment for a command run: one CPU thread, no network, plus `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(extra)
    return env


def run_console_script(name: str, argv: list, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an installed console script in a new process; skip the test when the package is not installed."""
    script = Path(sys.executable).parent / name
    if not script.is_file():
        script = shutil.which(name)
        if script is None:
            pytest.skip(f"{name} is not installed; run pip install -e .")
    return subprocess.run([str(script), *map(str, argv)], capture_output=True, text=True, env=env or script_env(), check=False,
                          timeout=timeout)  # fmt: skip


def without_write_override() -> list:
    """Return a command prefix that runs a program without root's right to write into read-only folders.

    As root, os.access and open succeed on a folder of mode 0o555, so setpriv drops CAP_DAC_OVERRIDE from the
    child. Other users need no prefix.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv, so no folder is read-only for the command")
    return [setpriv, "--inh-caps=-dac_override", "--bounding-set=-dac_override"]


def printed_values(stderr: str) -> list:
    """Return the stderr lines that look like a printed list or dict, which sys.exit(value) writes for a non-None
    return value."""
    return [line for line in stderr.splitlines() if line.startswith(("[", "{"))]
