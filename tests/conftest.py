from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from .hub_server import READ_TOKEN, WRITE_TOKEN, HubServer


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA (flash-attn, bitsandbytes, DeepSpeed): skip them cleanly elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------------------
# A local Hub for publishing tests (see tests/hub_server.py): the real clients talk HTTP to it, no internet.

# Env vars that would send clients elsewhere, use another token or block the network: removed for every Hub test.
_HUB_ENV_REMOVED = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
)


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """One in-memory Hub for the whole session (port 0); the `hub` fixture resets it before each test."""
    server = HubServer().start()
    yield server
    server.stop()


@dataclass
class LocalHub:
    """What a test needs to publish to the local Hub.

    In-process clients are already pointed at it. For a subprocess, pass `env={**os.environ, **hub.env}` (the
    test's os.environ already holds the same values while the test runs, so inheriting it works too).
    """

    server: HubServer
    endpoint: str
    home: Path
    monkeypatch: pytest.MonkeyPatch
    write_token: str = WRITE_TOKEN
    read_token: str = READ_TOKEN
    env: dict[str, str] = field(default_factory=dict)
    upload_mode: str = "lfs"

    def use_upload_mode(self, mode: str) -> None:
        """Switch server and clients together: "lfs" needs Xet off (LFS batch API), "regular" keeps Xet on."""
        from huggingface_hub import constants

        if mode not in ("lfs", "regular"):
            raise ValueError(f"upload mode must be 'lfs' or 'regular', not {mode!r}")
        disable_xet = mode == "lfs"
        self.server.upload_mode = mode
        self.upload_mode = mode
        self.env["HF_HUB_DISABLE_XET"] = "1" if disable_xet else "0"
        self.monkeypatch.setenv("HF_HUB_DISABLE_XET", self.env["HF_HUB_DISABLE_XET"])
        self.monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)


def _forget_client_state() -> None:
    """Drop what huggingface_hub caches across calls: the HTTP client and the fsspec instances (with their
    listings, tokens and endpoint), so nothing leaks from one test, or from the user's setup, into another."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import _http

    _http.close_session()
    HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """Point huggingface_hub, transformers and datasets (already imported or not) at a freshly reset local Hub,
    with a write token and caches in tmp_path. Default upload mode: "lfs" with Xet disabled."""
    import datasets.config
    import huggingface_hub.hf_api
    import transformers.utils.hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _auth, _cache_manager, _http

    hub_server.reset()
    endpoint = hub_server.endpoint
    home = tmp_path / "hf_home"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": WRITE_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    for name in _HUB_ENV_REMOVED:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # huggingface_hub reads its settings once, at import: patch the module attributes it reads at call time.
    host = urlsplit(endpoint).hostname
    hub_constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {host},
        "HF_HOME": env["HF_HOME"],
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in hub_constants.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(_auth, "_OIDC_TOKEN_CACHE", None)
    # The module-level HfApi behind `huggingface_hub.upload_folder` & co. fixed its endpoint at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "_whoami_cache", {})
    # transformers shares one HfApi, created lazily with the endpoint of its time: make it start over.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    # datasets copies the endpoint and its cache paths into `datasets.config` at import.
    datasets_config = {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": env["HF_HOME"],
        "HF_DATASETS_CACHE": Path(env["HF_DATASETS_CACHE"]),
        "DOWNLOADED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"]) / datasets.config.DOWNLOADED_DATASETS_DIR,
        "EXTRACTED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"])
        / datasets.config.DOWNLOADED_DATASETS_DIR
        / datasets.config.EXTRACTED_DATASETS_DIR,
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }
    for name, value in datasets_config.items():
        monkeypatch.setattr(datasets.config, name, value)

    _forget_client_state()
    local = LocalHub(server=hub_server, endpoint=endpoint, home=home, monkeypatch=monkeypatch, env=env)
    local.use_upload_mode("lfs")
    assert os.environ["HF_ENDPOINT"] == endpoint
    yield local
    _forget_client_state()
