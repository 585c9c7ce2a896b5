"""`--stage1-from RUN`: start a conversion from another run's stage-1 student, first-round layer
probes and (when RUN still has it) teacher reference.

Those depend on the teacher, the data, the linear type, the seed and the budget's data, stage-1 and
probe fields, but not on K, the selection method or the stage-2/3 budget. A run that differs from
RUN only there takes them over instead of recomputing them, so one stage 1 and one probe ranking
serve every softmax ratio and method of a study. The data are still prepared (from the cache) and
must come out as RUN's did. What RUN must hold is small — its settings, `state/` step files,
`stage1/mixers.safetensors` and `probes/` — so a stage 1 moves between machines without the
teacher's held-out hidden states (hundreds of MB at the larger budgets), which are then recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from hyla.convert.budgets import get_budget

AFTER_STAGE1 = ("softmax_layers", "softmax_ratio", "selection")
"""Settings that stage 1 and the probes do not depend on."""
AFTER_STAGE1_BUDGET = (
    "stage2_tokens", "stage2_lr_mixer", "stage2_lr_rest", "stage3_tokens", "stage3_lr", "stage3_seq_len",
    "checkpoint_every", "min_checkpoints",
)
"""Budget fields that stage 1 and the probes do not depend on."""
PROBE_FOLDERS = {"kl-guided": Path("probes"), "greedy-iterative": Path("probes") / "round_00"}
"""Where each probing method keeps the probes of every layer against the stage-1 student alone."""


def stage1_settings(settings: dict) -> dict:
    """The part of a run's settings (`ConvertOptions.settings()`) that its stage 1 and probes depend on."""
    budget = dataclasses.asdict(get_budget(settings["budget"], settings.get("overrides")))
    pinned = {k: v for k, v in settings.items() if k not in (*AFTER_STAGE1, "budget", "overrides")}
    pinned.update({f"budget.{k}": v for k, v in budget.items() if k not in AFTER_STAGE1_BUDGET})
    return pinned


def source_settings(source: Path) -> dict:
    path = source / "convert_settings.json"
    if not path.is_file():
        raise ValueError(f"--stage1-from {source}: not a conversion (no convert_settings.json)")
    return json.loads(path.read_text())


def adopt(
    source: Path, out: Path, settings: dict, files: list[str], method: str, optional: list[str] = ()
) -> int:
    """Copy `files` (paths relative to a run), `optional` when all of them are there, and the probes
    `method` can use from `source` into `out`; returns how many probes were taken. Raises ValueError
    when `source` cannot serve this run."""
    theirs, ours = stage1_settings(source_settings(source)), stage1_settings(settings)
    keys = sorted(theirs.keys() | ours.keys())
    diff = {k: (theirs.get(k), ours.get(k)) for k in keys if theirs.get(k) != ours.get(k)}
    if diff:
        raise ValueError(f"--stage1-from {source}: its stage 1 was made with other settings {diff} (there, here)")
    missing = [f for f in files if not (source / f).is_file()]
    if missing:
        raise ValueError(f"--stage1-from {source}: its stage 1 is not finished (missing {', '.join(missing)})")
    if all((source / f).is_file() for f in optional):
        files = [*files, *optional]
    for f in files:
        _link(source / f, out / f)
    dest = PROBE_FOLDERS.get(method)
    if dest is None:
        return 0
    found = (sorted((source / folder).glob("layer_*.json")) for folder in PROBE_FOLDERS.values())
    probes = next((files for files in found if files), [])
    for probe in probes:
        _link(probe, out / dest / probe.name)
    return len(probes)


def _link(src: Path, dst: Path) -> None:
    """A hard link of `src` at `dst` (a copy across file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
