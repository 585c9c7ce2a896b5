"""Model names to what `from_pretrained` reads: an alias, a `.gguf` file, a local dir or a hub id.

Light (no torch, no transformers), so that a name that names nothing fails at once. A GGUF teacher
is dequantised once into an HF dir under `$HYLA_CACHE/models` (default `~/.cache/hyla`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from hyla.assets import SMOLLM2, Asset, cache_root
from hyla.runtime.hub import check_hub_id
from hyla.runtime.load_errors import ModelLoadError, ModelNotFound

ALIASES: dict[str, tuple[Asset, str]] = {"smollm2-135m": (SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _exported(key: str, gguf: Callable[[], Path]) -> str:
    """The HF dir a GGUF file dequantises into (cached under `key`; the GGUF is read only once)."""
    out = cache_root() / "models" / key
    if not (out / "config.json").is_file():
        from hyla.runtime.loading import export_gguf

        export_gguf(gguf(), out)
    return str(out)


def _gguf_file(name: str) -> Path:
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ModelNotFound(f"no such GGUF file: {name}")
    return path


def resolve(name: str | os.PathLike[str]) -> str:
    """Turn an alias, a `.gguf` file, a local dir or a hub id into something `from_pretrained` reads.

    Raises `ModelNotFound` for a path that does not exist or a hub id that is neither cached nor
    reachable (checked in seconds), `ModelLoadError` for a dir without config.json, `MissingAsset`
    for an alias whose file has not been fetched.
    """
    name = str(name)
    if name.lower() in ALIASES:
        asset, filename = ALIASES[name.lower()]
        return _exported(name.lower(), lambda: asset.path(filename))
    if name.endswith(".gguf"):
        gguf = _gguf_file(name)
        return _exported(f"{gguf.stem}-{hashlib.sha1(str(gguf).encode()).hexdigest()[:10]}", lambda: gguf)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} exists but holds no config.json: not a model dir")
        return str(path)
    check_hub_id(name)
    return name
