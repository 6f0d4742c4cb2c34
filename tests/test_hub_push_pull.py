"""Push a saved pipeline to the test Hub server and pull it back with both loaders, here and in a clean venv."""

import json
import os
import socket
import subprocess
import sysconfig
import textwrap
import threading
import venv
from pathlib import Path

import numpy as np
import pytest
import torch
from command_helpers import run_console_script, script_env
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers_cfg.model_cards.model_card import write_model_card
from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training.hub import main, push_to_hub, select_files_to_push
from huggingface_hub import HfApi

ID2LABEL = {0: "zero", 1: "one", 2: "two"}
SAMPLE_KWARGS = {"class_labels": [1, 2], "guidance_scale": 4.0, "num_inference_steps": 2, "output_type": "np"}

PIPELINE_FILES = [
    "model_index.json",
    "pipeline_class_conditional.py",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]
PUSHED_FILES = sorted(PIPELINE_FILES + ["README.md", "eval_results.json", "samples.png", "samples/step-000001.png"])
# Written next to the pipeline by training, and never pushed.
LOCAL_ONLY_FILES = [
    "checkpoints/checkpoint-1/optimizer.bin",
    "checkpoints/checkpoint-1/model.safetensors",
    "checkpoint-2/random_states_0.pkl",
    "logs/train_cfg/events.out.tfevents.1700000000.host",
    "logs/train.log",
    "unet/optimizer.pt",
    "hub_token.txt",
    ".env.json",
    "notes.txt",
]


def build_pipeline(seed: int) -> ClassConditionalPipeline:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=4,
    )
    scheduler = DDIMScheduler(num_train_timesteps=100)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler, id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).images


def save_training_output(pipe, output_dir: Path, repo_id: str | None = None) -> Path:
    """Write what a training run leaves in its output folder: the pipeline, card, samples, reports and state."""
    pipe.save_pretrained(output_dir)
    write_model_card(output_dir, repo_id=repo_id, id2label=ID2LABEL, guidance_scale=4.0, versions={})
    for name in ("samples.png", "samples/step-000001.png"):
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (output_dir / "eval_results.json").write_text(json.dumps({"guidance": []}))
    for name in LOCAL_ONLY_FILES:
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(b"local state\0")
    return output_dir


@pytest.fixture
def output_dir(tmp_path):
    return save_training_output(build_pipeline(seed=0), tmp_path / "output")


def test_selection_keeps_state_local(output_dir):
    assert select_files_to_push(output_dir) == PUSHED_FILES


def test_push_rejects_folder_without_pipeline(tmp_path):
    (tmp_path / "README.md").write_text("# not a pipeline")

    with pytest.raises(ValueError, match="model_index.json is missing") as missing:
        push_to_hub(tmp_path, "test-user/nothing")
    assert str(tmp_path) in str(missing.value)
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "absent", "test-user/nothing")


def test_push_rejects_files_with_tokens(output_dir):
    token = "hf_" + "a" * 34
    (output_dir / "training_config.json").write_text(json.dumps({"hub_token": token}))
    with pytest.raises(ValueError, match="training_config.json contains an access token"):
        push_to_hub(output_dir, "test-user/leaky", token="hf_some_other_token")

    (output_dir / "training_config.json").write_text(json.dumps({"hub_token": "secret-value-1234"}))
    with pytest.raises(ValueError, match="training_config.json contains an access token"):
        push_to_hub(output_dir, "test-user/leaky", token="secret-value-1234")


def test_push_uploads_pipeline_not_state(hub_server, output_dir):
    commit = push_to_hub(output_dir, "cfg-tiny")

    api = HfApi()
    repo_id = f"{hub_server.user}/cfg-tiny"
    assert sorted(api.list_repo_files(repo_id)) == sorted(PUSHED_FILES + [".gitattributes"])
    assert commit.oid == api.model_info(repo_id).sha
    assert commit == commit.commit_url
    assert commit.commit_url.startswith(f"{hub_server.url}/{repo_id}/commit/")
    assert api.model_info(repo_id).private is False


def test_cli_pushes_private_repo(hub_server, output_dir):
    main([str(output_dir), "--hub_model_id", f"{hub_server.user}/cfg-cli", "--private"])

    api = HfApi()
    assert api.model_info(f"{hub_server.user}/cfg-cli").private is True
    assert "model_index.json" in api.list_repo_files(f"{hub_server.user}/cfg-cli")
    with pytest.raises(SystemExit):
        main([str(output_dir.parent), "--hub_model_id", "cfg-cli"])


def test_push_again_and_pull_both_loaders(hub_server, tmp_path):
    repo_id = f"{hub_server.user}/cfg-pull"
    first_pipe = build_pipeline(seed=0)
    first_dir = save_training_output(first_pipe, tmp_path / "first", repo_id)
    first = push_to_hub(first_dir, repo_id)
    first_images = sample(first_pipe)

    # A second training run: new weights, same configs.
    second_pipe = build_pipeline(seed=1)
    save_training_output(second_pipe, first_dir, repo_id)
    second = push_to_hub(first_dir, repo_id, commit_message="Retrain")
    second_images = sample(second_pipe)
    assert not np.array_equal(first_images, second_images)

    commits = hub_server.server.commits(repo_id)
    assert [commit["id"] for commit in commits[:2]] == [second.oid, first.oid]
    assert commits[0]["title"] == "Retrain"
    assert [op["path"] for op in commits[0]["operations"]] == ["unet/diffusion_pytorch_model.safetensors"]

    latest = ClassConditionalPipeline.from_pretrained(repo_id)
    assert type(latest) is ClassConditionalPipeline
    assert latest.id2label == ID2LABEL
    np.testing.assert_array_equal(sample(latest), second_images)

    old = ClassConditionalPipeline.from_pretrained(repo_id, revision=first.oid)
    np.testing.assert_array_equal(sample(old), first_images)

    remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    assert type(remote).__name__ == "ClassConditionalPipeline"
    assert type(remote).__module__.startswith("diffusers_modules.")
    np.testing.assert_array_equal(sample(remote), second_images)

    with pytest.raises(ValueError, match="trust_remote_code=True") as untrusted:
        DiffusionPipeline.from_pretrained(repo_id)
    assert "pipeline_class_conditional.py" in str(untrusted.value)


# A script run by the venv's interpreter: it checks that diffusers-cfg is missing, then loads the pipeline from the
# server as remote code and saves its images.
PULL_SCRIPT = """
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline

repo_id, output_path = sys.argv[1], sys.argv[2]
try:
    import diffusers_cfg
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"diffusers_cfg is importable in the clean environment, from {diffusers_cfg.__path__}")
# The .pth hook of an editable install must not have run either.
assert not [name for name in sys.modules if name.startswith("__editable__")], sorted(sys.modules)

pipe = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
print(f"{type(pipe).__module__}.{type(pipe).__qualname__}")
images = pipe(generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).images
np.save(output_path, images)
"""

# Started by a .pth file in the venv: nothing may import diffusers_cfg, and names other than loopback do not resolve.
VENV_GUARD = """
import socket
import sys


class BlockDiffusersCfg:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "diffusers_cfg" or name.startswith("diffusers_cfg."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden in this environment)", name=name)
        return None


sys.meta_path.insert(0, BlockDiffusersCfg)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo_loopback_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"):
        raise socket.gaierror(socket.EAI_NONAME, f"this environment may reach 127.0.0.1 only, not {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo_loopback_only
"""


def make_clean_venv(root: Path) -> Path:
    """Create a venv that imports this interpreter's packages except diffusers-cfg, and return its Python.

    The venv does not use --system-site-packages: that would run the `.pth` hooks of the system site-packages,
    among them the hook of the editable install. Instead, a `.pth` file lists the system site-packages folders as
    plain paths, which Python adds to sys.path without running the hooks in them. A second `.pth` file loads a guard
    that also hides a regular (non-editable) install of diffusers-cfg and blocks lookups of other hosts.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site_packages = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    system_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "system_packages.pth").write_text("".join(f"{path}\n" for path in system_paths))
    (site_packages / "clean_env_guard.py").write_text(VENV_GUARD)
    (site_packages / "clean_env_guard.pth").write_text("import clean_env_guard\n")
    return python


@pytest.mark.slow  # about 12 s on 2 cores, most of it the subprocess importing torch and diffusers
def test_remote_code_in_venv_without_package(hub_server, tmp_path):
    repo_id = f"{hub_server.user}/cfg-venv"
    pipe = build_pipeline(seed=0)
    push_to_hub(save_training_output(pipe, tmp_path / "output", repo_id), repo_id)
    expected = sample(pipe)
    python = make_clean_venv(tmp_path / "venv")
    script = tmp_path / "pull.py"
    script.write_text(f"SAMPLE_KWARGS = {SAMPLE_KWARGS!r}\n" + textwrap.dedent(PULL_SCRIPT))
    inherited = {name: value for name, value in os.environ.items() if not name.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env = {**inherited, **hub_server.env(), "HF_HOME": str(tmp_path / "venv-home")}

    no_package = subprocess.run(
        [python, "-c", "import diffusers_cfg"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert no_package.returncode != 0
    assert "ModuleNotFoundError" in no_package.stderr
    result = subprocess.run(
        [python, script, repo_id, tmp_path / "images.npy"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("diffusers_modules.")
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on: the system picked it free, and the socket is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_reports_refused_connection(output_dir, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = script_env(HF_ENDPOINT=endpoint, HF_TOKEN="hf_test_write_token_for_diffusers_cfg", HF_HOME=str(tmp_path),
                     HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    result = run_console_script("diffusers-cfg-push", [output_dir, "--hub_model_id", "test-user/cfg"], env=env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stderr
    assert f"the connection to the Hub at {endpoint} failed (ConnectError: " in errors[0]
    assert "Connection refused" in errors[0]


@pytest.fixture
def disconnecting_server():
    """Yield the URL of a server on 127.0.0.1 that reads each request and closes the connection without a response."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    thread.join(timeout=5)


def test_cli_reports_dropped_connection(hub_clients, disconnecting_server, output_dir, caplog):
    hub_clients(disconnecting_server)
    with pytest.raises(SystemExit) as exit_info:
        main([str(output_dir), "--hub_model_id", "test-user/cfg"])

    assert exit_info.value.code == 1
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert f"the connection to the Hub at {disconnecting_server} failed (RemoteProtocolError: " in message
    assert "\n" not in message
