"""`hyla eval report`: quality and speed of a teacher and its hybrids, measured on one machine.

For every model: a task suite through lm-eval, time to first token, decode tokens/s at each
(batch, context) pair, cache bytes per token / per sequence and the sequences that fit one cache
budget. Writes `report.md` (one table, rows = models), `report.json` and two PNG plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyla.runtime.cache_budget import max_concurrent
from hyla.runtime.engine import LLMEngine
from hyla.runtime.info import as_hybrid_config, cache_sizes, layer_pattern
from hyla.runtime.loading import parse_dtype
from hyla.runtime.sampling_params import SamplingParams


@dataclass
class ModelReport:
    name: str
    layers: str
    quality: dict[str, float] = field(default_factory=dict)
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tps: dict[str, float] = field(default_factory=dict)
    """'b{batch}@{context}' -> generated tokens per second across the batch, prefill excluded."""
    kv_bytes_per_token: int = 0
    state_bytes_per_sequence: int = 0
    max_seqs: dict[int, int] = field(default_factory=dict)
    """context -> sequences whose cache (KV in whole blocks + state) fits the budget at that length."""

    def bytes_per_sequence(self, context: int) -> int:
        return self.kv_bytes_per_token * context + self.state_bytes_per_sequence

    @property
    def mean_quality(self) -> float | None:
        scores = [v for k, v in self.quality.items() if not k.endswith("perplexity")]
        return sum(scores) / len(scores) if scores else None


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (length,), generator=g).tolist()


def measure_ttft(engine: LLMEngine, context: int, repeats: int = 2) -> float:
    """Median seconds from submission to the first generated token of one lone request."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        engine.generate([_prompt(context, engine.model.config.vocab_size, r)], params)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_decode(engine: LLMEngine, batch: int, context: int, new_tokens: int) -> float:
    """Generated tokens per second once every sequence of the batch has its first token."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.model.config.vocab_size
    for i in range(batch):
        engine.add_request(f"decode-{batch}-{context}-{i}", _prompt(context, vocab, i), params)
    started: set[str] = set()
    decode_start, tokens, done = None, 0, 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            done += out.finished
            if decode_start is not None:
                tokens += len(out.outputs[0].token_ids_delta)
            elif out.outputs[0].token_ids:
                started.add(out.request_id)
        if decode_start is None and len(started) == batch:
            decode_start = now  # every sequence is past prefill: from here on it is pure decode
    elapsed = time.perf_counter() - decode_start if decode_start is not None else 0.0
    return tokens / elapsed if done == batch and tokens and elapsed > 0 else float("nan")


def measure_model(
    name: str,
    engine: LLMEngine,
    quality: dict[str, float],
    contexts: list[int],
    batches: list[int],
    new_tokens: int,
    budget_bytes: int,
    kv_dtype: str,
    state_dtype: str,
) -> ModelReport:
    config = as_hybrid_config(engine.model.config)
    sizes = cache_sizes(config, parse_dtype(kv_dtype), parse_dtype(state_dtype))
    report = ModelReport(name, layer_pattern(config), quality, kv_bytes_per_token=sizes.kv_bytes_per_token,
                         state_bytes_per_sequence=sizes.state_bytes_per_sequence)
    usable = [c for c in contexts if c + new_tokens <= engine.max_model_len]
    for context in usable:
        report.ttft_ms[context] = measure_ttft(engine, context) * 1000
        for batch in batches:
            report.decode_tps[f"b{batch}@{context}"] = measure_decode(engine, batch, context, new_tokens)
    for context in contexts:
        report.max_seqs[context] = max_concurrent(sizes, budget_bytes, context, engine.config.block_size)
    return report


def render_markdown(reports: list[ModelReport], contexts: list[int], batches: list[int], budget_bytes: int) -> str:
    """One table, rows = models."""
    quality_keys = list(dict.fromkeys(k for r in reports for k in r.quality))
    decode_keys = [f"b{b}@{c}" for c in contexts for b in batches]
    head = (["model", "layers"] + quality_keys + [f"TTFT ms @{c}" for c in contexts]
            + [f"decode tok/s {k}" for k in decode_keys]
            + ["KV B/token", "state B/seq"] + [f"seqs @{c} in {budget_bytes / 2**30:g} GiB" for c in contexts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None or value != value else f"{value:,.{digits}f}"

    for r in reports:
        cells = [r.name, f"`{r.layers}`"]
        cells += [num(r.quality.get(k), 2 if k.endswith("perplexity") else 4) for k in quality_keys]
        cells += [num(r.ttft_ms.get(c)) for c in contexts]
        cells += [num(r.decode_tps.get(k)) for k in decode_keys]
        cells += [f"{r.kv_bytes_per_token:,}", f"{r.state_bytes_per_sequence:,}"]
        cells += [f"{r.max_seqs[c]:,}" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality_vs_speed(reports: list[ModelReport], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        x, y = r.decode_tps.get(key), r.mean_quality
        if x is not None and y is not None:
            ax.scatter([x], [y])
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.3, y=0.15)
    ax.set_xlabel(f"decode tokens/s ({key.replace('b', 'batch ').replace('@', ', context ')})")
    ax.set_ylabel("mean accuracy over the suite")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(reports: list[ModelReport], max_context: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [2**k for k in range(6, max(7, max_context.bit_length()))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        ax.plot(xs, [r.bytes_per_sequence(x) / 2**20 for x in xs], marker=".", label=r.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache per sequence (MiB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    reports: list[ModelReport], contexts: list[int], batches: list[int], budget_bytes: int, out: Path, header: str = ""
) -> Path:
    """report.md + report.json + quality_vs_throughput.png + memory_vs_context.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table = render_markdown(reports, contexts, batches, budget_bytes)
    key = next((k for k in (f"b{b}@{c}" for c in contexts for b in reversed(batches))
                if any(k in r.decode_tps for r in reports)), "")
    plot_quality_vs_speed(reports, key, out / "quality_vs_throughput.png")
    plot_memory(reports, max(contexts) * 2, out / "memory_vs_context.png")
    text = (
        "# hyla report\n\n" + header + "\n\n" + table
        + "\n\n![quality vs decode throughput](quality_vs_throughput.png)\n![cache memory vs context](memory_vs_context.png)\n"
    )
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return out / "report.md"
