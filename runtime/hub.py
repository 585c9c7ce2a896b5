"""Hub ids that cannot load fail in seconds: not cached and offline, or the hub unreachable."""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
import urllib.request

from huggingface_hub import constants, try_to_load_from_cache

from hyla.runtime.load_errors import ModelNotFound

REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
CONNECT_TIMEOUT_S = 3.0


def hub_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `endpoint` (or the HTTPS proxy) opens within `timeout` s, name
    lookup included."""
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or endpoint)
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return opened == [True]


def check_hub_id(name: str, endpoint: str | None = None) -> None:
    """`ModelNotFound` unless `name` is a hub id that is cached or can be fetched now from `endpoint`
    (default: the configured hub, `HF_ENDPOINT`)."""
    endpoint = endpoint or constants.ENDPOINT
    if not REPO_ID.fullmatch(name) or name.startswith("."):
        raise ModelNotFound(f"{name}: no such file or directory")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{name}: no such local path, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    if not hub_reachable(endpoint):
        raise ModelNotFound(f"{name}: no such local path, and the Hugging Face hub ({endpoint}) is unreachable")
