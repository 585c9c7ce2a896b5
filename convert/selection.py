"""Which layers keep softmax attention.

- `kl-guided`: probe every layer on the stage-1 student (see `probes.py`) and keep the K whose
  restoration gives the lowest held-out KL.
- `greedy-iterative`: K rounds; each round probes every remaining layer added to the layers chosen
  so far and keeps the best one (K·L probes instead of L).
- `uniform`: K evenly spaced layers (the centre of each of K equal spans).
- `layers:i,j,…`: exactly these.
"""

from __future__ import annotations

from pathlib import Path

from hyla.convert.probes import ProbeRunner

METHODS = ("kl-guided", "uniform", "greedy-iterative")


def softmax_count(num_layers: int, count: int | None, ratio: float) -> int:
    """K from an explicit count or a ratio of the layers (rounded, at least 0)."""
    k = count if count is not None else round(ratio * num_layers)
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot keep {k} softmax layers in a {num_layers}-layer model")
    return k


def parse_selection(spec: str, num_layers: int) -> tuple[str, list[int] | None]:
    """(method, explicit layers or None); a clear error for anything else."""
    if spec.startswith("layers:"):
        try:
            layers = sorted({int(x) for x in spec[len("layers:") :].split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"bad selection {spec!r}: use layers:i,j,… with integers") from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {num_layers}-layer model")
        return "layers", layers
    if spec not in METHODS:
        raise ValueError(f"unknown selection {spec!r}; choose from {', '.join(METHODS)} or layers:i,j,…")
    return spec, None


def uniform_layers(num_layers: int, k: int) -> list[int]:
    """The centre layer of each of `k` equal spans."""
    return sorted({int((i + 0.5) * num_layers / k) for i in range(k)})


def rank_by_kl(results: dict[int, dict]) -> list[int]:
    """Layers ordered best first (lowest KL; ties by index)."""
    return sorted(results, key=lambda layer: (results[layer]["kl"], layer))


def select_layers(method: str, k: int, num_layers: int, runner: ProbeRunner | None, folder: Path) -> dict:
    """Run a selection method; returns `{"method", "selected", "probes"}` (probes: per round)."""
    if method == "uniform":
        return {"method": method, "selected": uniform_layers(num_layers, k) if k else [], "probes": []}
    if method == "kl-guided":
        results = runner.run(list(range(num_layers)), [], folder / "probes")
        return {"method": method, "selected": sorted(rank_by_kl(results)[:k]), "probes": [_scores(results)]}
    chosen: list[int] = []
    rounds = []
    for r in range(k):
        candidates = [i for i in range(num_layers) if i not in chosen]
        results = runner.run(candidates, chosen, folder / "probes" / f"round_{r:02d}", f"probes round {r + 1}/{k}")
        chosen.append(rank_by_kl(results)[0])
        rounds.append(_scores(results))
    return {"method": method, "selected": sorted(chosen), "probes": rounds}


def _scores(results: dict[int, dict]) -> dict[str, dict]:
    return {
        str(layer): {"kl": r["kl"], "ppl": r["ppl"], "seconds": r["seconds"], "train_tokens": r["train_tokens"]}
        for layer, r in sorted(results.items())
    }
