"""Talking to the Hugging Face hub without hanging when it cannot be reached.

Without ``HF_HUB_OFFLINE=1``, ``load_dataset`` on a machine with no network retries for about 24 s
before failing. A plain TCP connect to the hub (or to the HTTPS proxy, when one is set) answers in
milliseconds or times out after ``PROBE_TIMEOUT_S``; when it fails we switch the libraries to offline
mode for the call, so a dataset or tokenizer already in the local HF cache still loads and anything
else fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """True when the user (or the environment) already put the HF libraries offline."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(n, "").strip().lower() in _TRUE for n in names):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _probe_target() -> tuple[str, int]:
    """The host a request to the hub really connects to first: the HTTPS proxy if set, else the hub."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    hub_host = endpoint.hostname or "huggingface.co"
    no_proxy = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    bypass = any(hub_host.endswith(h.strip().lstrip(".")) for h in no_proxy.split(",") if h.strip())
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(name)
        if proxy and not bypass:
            p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if p.hostname:
                return p.hostname, p.port or 8080
    return hub_host, endpoint.port or (443 if endpoint.scheme != "http" else 80)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub (or proxy). Run in a thread because DNS lookups ignore socket timeouts."""
    host, port = _probe_target()
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


@contextlib.contextmanager
def forced_offline() -> Iterator[None]:
    """Put huggingface_hub (and datasets, if imported) offline for the duration, then restore them.

    Both libraries read their offline flag from a module constant at call time, so patching the constant
    works after import, unlike setting the environment variable.
    """
    from huggingface_hub import constants

    saved_hub = constants.HF_HUB_OFFLINE
    ds_config = sys.modules.get("datasets.config")
    saved_ds = getattr(ds_config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_hub
        if ds_config is not None:
            ds_config.HF_HUB_OFFLINE = saved_ds


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[str]:
    """Yields '' when the hub may be used, or a short reason when calls run offline (cache only)."""
    if offline_mode():
        yield "offline mode is set (HF_HUB_OFFLINE)"
    elif hub_reachable():
        yield ""
    else:
        host, port = _probe_target()
        with forced_offline():
            yield f"{host}:{port} is unreachable"
