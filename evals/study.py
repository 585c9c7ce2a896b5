"""A layer-selection study: conversions of one teacher that differ in softmax ratio and selection
method, each evaluated the same way, and what that shows.

Every model gets one JSON in the study's folder (`model_entry`): its conversion (method, softmax
layers, held-out KL and perplexity against the teacher, budget, training speed), lm-eval scores,
recall by probe and context length, and decode tokens/s. `summarize` merges them into
`summary.json`, `README.md` (tables, method against method at each ratio, how much of the teacher's
scores each hybrid keeps) and `quality_vs_ratio.png`. It reads only those JSONs, so the files
regenerate anywhere; a hand-written `NOTES.md` beside them is copied into the README.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import PretrainedConfig

from hyla.runtime.info import as_hybrid_config

RECALL_PROBES = ("niah_single", "niah_multikey", "variable_tracking")
GENERATED = ("summary.json",)


def split_scores(results: dict) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """lm-eval results → (one headline number per task, recall scores per probe: overall and per length)."""
    from hyla.evals.cli import headline

    tasks = {k: v for k, v in headline(results).items() if k.split("/")[0] not in RECALL_PROBES}
    recall = {}
    for probe in RECALL_PROBES:
        metrics = results["results"].get(probe)
        if metrics is not None:
            recall[probe] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                             if k.startswith(("score,", "len_")) and isinstance(v, (int, float)) and v >= 0}
    return tasks, recall


def model_entry(
    name: str, model: Path, num_layers: int, softmax_layers: list[int], results: dict,
    decode_tok_s: dict[str, float], command: str, device: str,
) -> dict:
    """The JSON of one model: its conversion (read from `conversion_report.json` when it is one),
    scores and speed."""
    report_path = model / "conversion_report.json"
    entry: dict = {"name": name, "model": str(model), "command": command, "device": device,
                   "num_layers": num_layers, "softmax_layers": softmax_layers,
                   "ratio": round(len(softmax_layers) / num_layers, 4)}
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        entry["method"] = report["selection"]["method"]
        entry["heldout"] = {k: report["heldout"]["result"][k] for k in ("kl", "ppl")}
        entry["teacher_heldout_ppl"] = report["heldout"]["teacher"]["ppl"]
        entry["conversion"] = {
            "budget": report["budget"],
            "stages": {stage: {k: v for k, v in summary.items() if k != "curve"}
                       for stage, summary in report["stages"].items()},
            "selection_seconds": report["selection"].get("seconds"),
        }
    else:
        entry["method"] = "teacher"
        entry["heldout"] = {"kl": 0.0, "ppl": None}
    tasks, recall = split_scores(results)
    entry["tasks"] = tasks
    entry["core_average"] = _mean(v for k, v in tasks.items() if not k.endswith("perplexity"))
    entry["recall"] = recall
    entry["recall_average"] = _mean(r["score"] for r in recall.values() if "score" in r)
    entry["decode_tok_s"] = decode_tok_s
    return entry


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def load_entries(folder: Path) -> list[dict]:
    """Every model JSON of a study folder: the teacher first, then by softmax ratio and method."""
    entries = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name not in GENERATED]
    teacher_ppl = next((e["teacher_heldout_ppl"] for e in entries if e.get("teacher_heldout_ppl")), None)
    for e in entries:
        if e["method"] == "teacher" and e["heldout"]["ppl"] is None:
            e["heldout"]["ppl"] = teacher_ppl  # every conversion scores the same held-out text
    return sorted(entries, key=lambda e: (e["method"] != "teacher", e["ratio"], e["method"], e["name"]))


def comparisons(entries: list[dict], base: str = "uniform", challenger: str = "kl-guided") -> list[dict]:
    """At every ratio with both methods: lower held-out KL, higher core average, higher recall?"""
    out = []
    for ratio in sorted({e["ratio"] for e in entries}):
        pair = {e["method"]: e for e in entries if e["ratio"] == ratio and e["method"] in (base, challenger)}
        if len(pair) < 2:
            continue
        a, b = pair[challenger], pair[base]
        out.append({
            "ratio": ratio, "challenger": a["name"], "base": b["name"],
            "lower_kl": a["heldout"]["kl"] < b["heldout"]["kl"],
            "higher_core": _gt(a["core_average"], b["core_average"]),
            "higher_recall": _gt(a["recall_average"], b["recall_average"]),
        })
    return out


def _gt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a > b


def recovery(entries: list[dict]) -> dict[str, float]:
    """Each hybrid's core average as a fraction of the teacher's."""
    teacher = next((e for e in entries if e["method"] == "teacher"), None)
    if teacher is None or not teacher["core_average"]:
        return {}
    return {e["name"]: e["core_average"] / teacher["core_average"]
            for e in entries if e["method"] != "teacher" and e["core_average"] is not None}


def summarize(folder: Path) -> Path:
    """Write `summary.json`, `quality_vs_ratio.png` and `README.md` from the folder's model JSONs."""
    entries = load_entries(folder)
    if not entries:
        raise FileNotFoundError(f"{folder} holds no model JSONs")
    checks, kept = comparisons(entries), recovery(entries)
    summary = {"models": [{k: e.get(k) for k in ("name", "method", "ratio", "softmax_layers", "heldout", "tasks",
                                                 "core_average", "recall", "recall_average", "decode_tok_s")}
                          for e in entries],
               "kl_guided_vs_uniform": checks, "teacher_recovery": kept}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(entries, folder / "quality_vs_ratio.png")
    (folder / "README.md").write_text(render(folder, entries, checks, kept))
    return folder / "README.md"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _speed_key(entries: list[dict]) -> str | None:
    """The decode point shown in the main table: the largest batch at the longest context measured."""
    keys = {k for e in entries for k in e.get("decode_tok_s", {})}
    parse = lambda k: tuple(int(x) for x in k.lstrip("b").split("@"))[::-1]  # noqa: E731 (context, batch)
    return max(keys, key=parse) if keys else None


def render(folder: Path, entries: list[dict], checks: list[dict], kept: dict[str, float]) -> str:
    speed = _speed_key(entries)
    notes = folder / "NOTES.md"
    text = notes.read_text().strip() if notes.is_file() else ""
    title, _, rest = text.partition("\n") if text.startswith("# ") else (f"# {folder.name}", "", text)
    lines = [title, "", f"Generated by `hyla eval study {folder}` from the model JSONs here"
             + (" and `NOTES.md`." if text else "."), ""]
    lines += [rest.strip(), ""] if rest.strip() else []
    budget = next((e["conversion"]["budget"] for e in entries if "conversion" in e), None)
    if budget:
        fields = ("seq_len", "batch_size", "stage1_tokens", "probe_tokens", "probe_eval_tokens", "stage2_tokens",
                  "stage3_tokens", "heldout_tokens")
        lines += ["Budget of every conversion: " + ", ".join(f"`{k}={budget[k]:,}`" for k in fields) + ".", ""]
    head = ["model", "method", "softmax", "layers", "held-out KL", "ppl", "core avg", "kept", "recall"]
    head += [f"tok/s {speed}"] if speed else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["name"], e["method"], f"{len(e['softmax_layers'])}/{e['num_layers']} ({e['ratio']:.1%})",
                 " ".join(map(str, e["softmax_layers"])) if e["method"] != "teacher" else "all",
                 _num(e["heldout"]["kl"], 4), _num(e["heldout"]["ppl"], 2), _num(e["core_average"]),
                 f"{kept[e['name']]:.1%}" if e["name"] in kept else "-", _num(e["recall_average"])]
        cells += [_num(e["decode_tok_s"].get(speed), 1)] if speed else []
        lines.append("| " + " | ".join(cells) + " |")
    if checks:
        lines += ["", "KL-guided against uniform at the same ratio:", ""]
        word = {True: "yes", False: "**no**", None: "-"}
        lines += ["| ratio | lower held-out KL | higher core average | higher recall |", "|---|---|---|---|"]
        lines += [f"| {c['ratio']:.1%} | " + " | ".join(word[c[k]] for k in ("lower_kl", "higher_core", "higher_recall"))
                  + " |" for c in checks]
    tasks = list(dict.fromkeys(k for e in entries for k in e["tasks"]))
    if tasks:
        lines += ["", "Per task:", "", "| model | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        lines += ["| " + e["name"] + " | " + " | ".join(_num(e["tasks"].get(t)) for t in tasks) + " |" for e in entries]
    lengths = sorted({k for e in entries for r in e["recall"].values() for k in r if k.startswith("len_")},
                     key=lambda k: int(k[4:]))
    if lengths:
        lines += ["", "Recall (all probes) by context length:", "",
                  "| model | " + " | ".join(k[4:] for k in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
        for e in entries:
            cells = [_num(_mean(r[k] for r in e["recall"].values() if k in r)) for k in lengths]
            lines.append("| " + e["name"] + " | " + " | ".join(cells) + " |")
    lines += ["", "![quality against softmax ratio](quality_vs_ratio.png)", "", "Commands:", ""]
    lines += [f"- {e['name']}: `{e['command']}`" for e in entries]
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], path: Path) -> None:
    """Held-out KL, core average and recall against the softmax ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("held-out KL (teacher ‖ model)", lambda e: e["heldout"]["kl"]),
              ("lm-eval core average", lambda e: e["core_average"]),
              ("recall average", lambda e: e["recall_average"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    teacher = next((e for e in entries if e["method"] == "teacher"), None)
    for ax, (title, value) in zip(axes, panels):
        for method in dict.fromkeys(e["method"] for e in entries if e["method"] != "teacher"):
            points = sorted((e["ratio"], value(e)) for e in entries if e["method"] == method and value(e) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if teacher is not None and value(teacher) is not None and title != panels[0][0]:
            ax.axhline(value(teacher), color="gray", linestyle="--", label="teacher")
        ax.set_xlabel("softmax layers / all layers")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def softmax_layers_of(config: PretrainedConfig) -> tuple[int, list[int]]:
    """(layers, the indices of the softmax ones) of a teacher's or a hybrid's config."""
    config = as_hybrid_config(config)
    return config.num_hidden_layers, [i for i, t in enumerate(config.layer_types) if t == "attention"]
