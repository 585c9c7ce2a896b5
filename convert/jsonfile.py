"""JSON files written whole or not at all: a temporary file beside the target, then renamed over it."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON to `path`; a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
