"""`conversion_report.json` and `conversion_report.png` (per-layer probe scores and loss curves)."""

from __future__ import annotations

from pathlib import Path

from hyla.convert.jsonfile import write_json


def write_report(out: Path, report: dict) -> Path:
    """Write the JSON report and its figure; returns the JSON path."""
    path = out / "conversion_report.json"
    write_json(path, report)
    plot(report, out / "conversion_report.png")
    return path


def plot(report: dict, path: Path) -> None:
    """Left: held-out KL of each layer's probe (selected layers highlighted). Right: loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rounds = report["selection"]["probes"]
    selected = set(report["selection"]["selected"])
    if rounds:
        scores = {int(k): v["kl"] for k, v in rounds[0].items()}
        layers = sorted(scores)
        colors = ["tab:red" if i in selected else "tab:blue" for i in layers]
        left.bar(layers, [scores[i] for i in layers], color=colors)
        left.set_xlabel("layer restored to softmax attention")
        left.set_ylabel("held-out KL(teacher ‖ probe)")
        left.set_title(f"{report['selection']['method']} probes (red: selected)")
    else:
        left.text(0.5, 0.5, f"{report['selection']['method']}: no probes\nselected {sorted(selected)}",
                  ha="center", va="center")
        left.set_axis_off()
    for stage, result in report["stages"].items():
        curve = result.get("curve") or []
        if curve:
            right.plot([s for s, _ in curve], [v for _, v in curve], label=stage)
    right.set_yscale("log")
    right.set_xlabel("optimizer step")
    right.set_ylabel("loss")
    right.set_title("training loss per stage")
    if right.lines:
        right.legend()
    fig.suptitle(f"{report['teacher']} → {report['linear']} hybrid, softmax layers {sorted(selected)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
