"""Pytest fixture wiring the (already imported) ``huggingface_hub`` / ``transformers`` / ``diffusers`` to a LocalHub.

Use it from ``tests/conftest.py`` with ``from hub_fixtures import local_hub  # noqa: F401`` (``tests/`` is on
``sys.path`` under pytest's default ``prepend`` import mode, or with ``pythonpath = ["tests"]``)::

    def test_roundtrip(local_hub):
        model.push_to_hub("tiny")                                  # -> local-user/tiny on the local server
        LlamaForCausalLM.from_pretrained(f"{local_hub.user}/tiny")
        local_hub.run_python("...")                                # fresh interpreter, configured by env vars

Why environment variables are not enough in-process: ``huggingface_hub.constants`` reads ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``... once, at import time, and several objects capture the
endpoint when they are built. :func:`configure_hf_client` patches each of those places (see its docstring).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hub_server import LocalHub

__all__ = ["configure_hf_client", "local_hub"]

# Modules that bind `HF_HUB_OFFLINE` by value (`from huggingface_hub.constants import HF_HUB_OFFLINE`) at import time:
# if the suite runs with HF_HUB_OFFLINE=1, they would keep refusing to download from the local hub.
_MODULES_BINDING_HF_HUB_OFFLINE = (
    "diffusers.utils.hub_utils",
    "diffusers.loaders.lora_base",
    "diffusers.models.attention_dispatch",
)


def configure_hf_client(monkeypatch: pytest.MonkeyPatch, hub: LocalHub, hf_home: Path) -> None:
    """Point the current process' Hugging Face clients at ``hub``, with caches and token under ``hf_home``.

    Everything goes through ``monkeypatch`` so it is undone at teardown. What is patched, and why:

    * environment (:meth:`LocalHub.env`): ``HF_ENDPOINT``, ``HF_HOME`` (+ explicit ``HF_HUB_CACHE`` etc.),
      ``HF_TOKEN`` (read on every call by ``get_token()``, so this alone handles auth), ``HF_HUB_OFFLINE=0``,
      ``HF_HUB_DISABLE_XET=1``... for modules imported later and for subprocesses;
    * ``huggingface_hub.constants``: ``ENDPOINT`` (default for every ``HfApi(endpoint=None)`` and for
      ``ModelCard.validate``), ``HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url`` formats it and only rewrites URLs
      that start with ``ENDPOINT``), ``HF_URL_HOSTS``, the cache / token paths derived from ``HF_HOME``,
      ``HF_HUB_OFFLINE`` (read by ``is_offline_mode()``), ``HF_HUB_DISABLE_XET``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``;
    * ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi()`` whose bound methods are exported as
      ``huggingface_hub.create_repo`` / ``upload_file`` / ``model_info``... (used by ``ModelCard.push_to_hub`` and
      by diffusers) captured the endpoint when ``huggingface_hub`` was imported;
    * ``transformers.utils.hub._hf_api``: transformers caches one ``HfApi`` (built on first use, endpoint frozen);
      reset to ``None`` so it is rebuilt against the local hub (and again after the test);
    * diffusers modules that copied ``HF_HUB_OFFLINE`` at import time.
    """
    from huggingface_hub import constants, hf_api

    hf_home.mkdir(parents=True, exist_ok=True)
    for name in ("HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in hub.env(hf_home).items():
        monkeypatch.setenv(name, value)

    endpoint = hub.endpoint
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname or hub.host},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # `scan_cache_dir()` / cached assets defaults were bound by value from constants at import time.
    monkeypatch.setattr("huggingface_hub.utils._cache_manager.HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr("huggingface_hub.utils._cache_assets.HF_ASSETS_CACHE", str(hf_home / "assets"), raising=False)

    # Only touch transformers / diffusers if the test process already imported them (importing them is slow);
    # if they get imported later, they read the patched constants / env vars above.
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    for module_name in _MODULES_BINDING_HF_HUB_OFFLINE:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """A fresh, empty :class:`LocalHub` on a free port, with the in-process HF clients pointed at it.

    ``HF_HOME`` is ``tmp_path / "hf_home"`` (also the default for ``local_hub.run_python`` / ``local_hub.env()``),
    ``HF_TOKEN`` is the hub's dummy write token, and repos created without a namespace land under ``local_hub.user``.
    """
    hf_home = tmp_path / "hf_home"
    hub = LocalHub(hf_home=hf_home).start()
    try:
        configure_hf_client(monkeypatch, hub, hf_home)
        yield hub
    finally:
        hub.stop()
        # transformers may have created (and cached) its HfApi during the test, bound to this now-dead endpoint.
        # Reset it; if it was patched above, monkeypatch's own teardown (which runs after this) restores the old one.
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None:
            transformers_hub._hf_api = None  # type: ignore[attr-defined]
