"""Shared pytest fixtures."""

# ---------------------------------------------------------------------------------------------------------------------
# Hub server: a Hub-compatible HTTP server of the project's own, with the real clients pointed at it.
# ---------------------------------------------------------------------------------------------------------------------

import contextlib
import dataclasses
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hub_server import HubServer

HUB_TEST_USER = "test-user"
HUB_TEST_TOKEN = "hf_test_write_token_for_diffusers_cfg"

# Hosts that the clients may reach while a Hub test runs; any other lookup fails the test.
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclasses.dataclass
class HubEndpoint:
    """What a test needs to talk to the running server."""

    url: str  # the value of HF_ENDPOINT
    token: str  # a token with write access to the namespace `user`
    user: str
    server: HubServer | None  # None for a server that the test started itself, such as a third-party one
    home: Path  # the value of HF_HOME: caches, downloaded modules and token files live here

    def env(self) -> dict[str, str]:
        """Return the environment variables that point a fresh Python process at this server."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HOME": str(self.home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        }


def _point_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: HubEndpoint) -> None:
    """Point huggingface_hub, diffusers and datasets at the server, in this process.

    The environment variables reach new processes only: the three libraries read them into module constants at
    import time (huggingface_hub 2.4, diffusers 0.42, datasets 5.2), and huggingface_hub's module-level `HfApi`,
    behind `create_repo`, `model_info` and friends, copies the endpoint when it is built. So the constants are
    patched too.
    """
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)
    for name in (
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN_PATH",
        "HF_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_MODULES_CACHE",
        "HF_DATASETS_CACHE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)

    import huggingface_hub.constants as hub_constants
    import huggingface_hub.hf_api

    home = endpoint.home
    hub_cache = str(home / "hub")
    patches = {
        "ENDPOINT": endpoint.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": hub_constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "default_cache_path": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(hub_constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint.url)
    import huggingface_hub.utils._cache_manager as cache_manager

    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", hub_cache)

    import diffusers.utils.constants as diffusers_constants
    import diffusers.utils.dynamic_modules_utils as dynamic_modules
    import diffusers.utils.hub_utils as diffusers_hub_utils

    # diffusers copies remote pipeline code into HF_MODULES_CACHE and appends that folder to sys.path.
    modules_cache = str(home / "modules")
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", modules_cache)
    monkeypatch.setattr(diffusers_constants, "HF_MODULES_CACHE", modules_cache)
    monkeypatch.setattr(diffusers_constants, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint.url)
    monkeypatch.setattr(diffusers_hub_utils, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint.url)
    monkeypatch.setattr(diffusers_hub_utils, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers_hub_utils, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(sys, "path", list(sys.path))

    import datasets.config as datasets_config

    datasets_cache = home / "datasets"
    datasets_patches = {
        "HF_ENDPOINT": endpoint.url,
        "HUB_DATASETS_URL": endpoint.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_MODULES_CACHE": Path(modules_cache),
        "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
        # Both would contact other hosts: the dataset viewer (datasets-server.<endpoint host>) and an S3 bucket.
        "USE_PARQUET_EXPORT": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }
    for name, value in datasets_patches.items():
        monkeypatch.setattr(datasets_config, name, value)


def _block_other_hosts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every host name lookup except loopback fail, and return the list that records the attempts.

    Some clients ignore network errors: datasets counts downloads with a request whose errors it ignores. So a
    failed lookup alone would go unnoticed, and the fixture checks the list after the test.
    """
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo_loopback_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in _LOOPBACK_HOSTS:
            attempts.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"Hub tests may reach 127.0.0.1 only, not {name}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo_loopback_only)
    return attempts


@contextlib.contextmanager
def _clients_pointed_at(monkeypatch: pytest.MonkeyPatch, endpoint: HubEndpoint) -> Iterator[list[str]]:
    """Point the clients at `endpoint` and block other hosts, for the time of the block; yield the blocked lookups.

    On exit, closes the clients' HTTP sessions and unloads the remote-code modules that diffusers imported, so that
    the next test downloads afresh. monkeypatch restores the patched settings later, at its own teardown.
    """
    modules_before = {name for name in sys.modules if name.startswith("diffusers_modules")}
    try:
        _point_clients_at(monkeypatch, endpoint)
        yield _block_other_hosts(monkeypatch)
    finally:
        import huggingface_hub
        from huggingface_hub import HfFileSystem

        huggingface_hub.close_session()
        HfFileSystem.clear_instance_cache()
        for name in [name for name in sys.modules if name.startswith("diffusers_modules")]:
            if name not in modules_before:
                del sys.modules[name]


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """Start a Hub-compatible server on 127.0.0.1 and point huggingface_hub, diffusers and datasets at it.

    Yields a `HubEndpoint` (`.url`, `.token`, `.user`, `.server`, `.home`). After the test, the fixture fails it
    if the server raised an exception, received a request it has no route for, or a client looked up another host.
    """
    server = HubServer(tokens={HUB_TEST_TOKEN: HUB_TEST_USER}, storage_dir=tmp_path / "hub-storage")
    server.start()
    endpoint = HubEndpoint(server.url, HUB_TEST_TOKEN, HUB_TEST_USER, server, tmp_path / "hf-home")
    try:
        with _clients_pointed_at(monkeypatch, endpoint) as blocked_lookups:
            yield endpoint
    finally:
        server.stop()

    assert not server.errors, "The Hub server raised while handling requests:\n" + "\n".join(server.errors)
    assert not server.unknown_routes, f"The Hub server has no route for: {server.unknown_routes}"
    assert not blocked_lookups, f"A client tried to reach hosts other than 127.0.0.1: {blocked_lookups}"


@pytest.fixture
def hub_clients(tmp_path, monkeypatch) -> Iterator[Callable[[str], HubEndpoint]]:
    """Return a function that points the clients at a Hub-compatible server on 127.0.0.1 by its URL.

    For servers that the test starts itself: the function returns a `HubEndpoint` with `.server` None and a fresh
    `HF_HOME`. After the test, the fixture fails it if a client looked up a host other than loopback.
    """
    blocked_per_call: list[list[str]] = []
    with contextlib.ExitStack() as stack:

        def point_clients_at(url: str) -> HubEndpoint:
            endpoint = HubEndpoint(url, HUB_TEST_TOKEN, HUB_TEST_USER, None, tmp_path / "hf-home")
            blocked_per_call.append(stack.enter_context(_clients_pointed_at(monkeypatch, endpoint)))
            return endpoint

        yield point_clients_at

    blocked_lookups = [host for blocked in blocked_per_call for host in blocked]
    assert not blocked_lookups, f"A client tried to reach hosts other than 127.0.0.1: {blocked_lookups}"


# ---------------------------------------------------------------------------------------------------------------------
