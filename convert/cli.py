"""`hyla convert`: distil a softmax-attention teacher into a hybrid (see convert/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from hyla.convert.budgets import BUDGETS
from hyla.runtime.load_errors import ModelLoadError
from hyla.runtime.locate import resolve


def _overrides(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set needs KEY=VALUE, got {item!r}")
        pairs[key.strip().replace("-", "_")] = value.strip()
    return pairs


def convert(
    teacher: str = typer.Option(..., help="Teacher: alias (smollm2-135m), HF dir, hub id or .gguf file."),
    out: Path = typer.Option(..., help="Output dir: checkpoint, report and resumable state."),
    linear: str = typer.Option("gdn", help="Linear-attention type of the converted layers: gdn or gla."),
    softmax_layers: int = typer.Option(None, help="Number K of layers that keep softmax attention."),
    softmax_ratio: float = typer.Option(0.25, help="K as a fraction of the layers (when --softmax-layers is unset)."),
    selection: str = typer.Option("kl-guided", help="kl-guided, uniform, greedy-iterative or layers:i,j,…"),
    data: str = typer.Option(
        "default", help="default (built-in offline corpus), PATH (txt/jsonl/parquet/dir) or hf:NAME[:config]."
    ),
    budget: str = typer.Option("quick", help=f"Preset of token counts / lrs / lengths: {', '.join(BUDGETS)}."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a budget field, e.g. --set stage2_tokens=2e6 --set seq_len=512 (repeatable)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast, fla kernels)."),
    seed: int = typer.Option(0, help="Seed of the new parameters and of the data order."),
    nproc: int = typer.Option(1, min=1, help="Processes (one per GPU, or CPU processes with gloo); launches torchrun."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of progress bars."),
) -> None:
    """Convert TEACHER into a hybrid: data, stage 1, layer selection, stage 2, (stage 3), export.

    Every step persists into OUT; rerunning the same command resumes where it stopped, and is a
    no-op once the conversion is done.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        args = [f"--teacher={teacher}", f"--out={out}", f"--linear={linear}", f"--softmax-ratio={softmax_ratio}",
                f"--selection={selection}", f"--data={data}", f"--budget={budget}", f"--device={device}",
                f"--seed={seed}", *(f"--set={s}" for s in set_), *(["--quiet"] if quiet else []),
                *([f"--softmax-layers={softmax_layers}"] if softmax_layers is not None else [])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hyla.convert", *args]
        raise typer.Exit(subprocess.call(cmd))
    try:
        resolve(teacher)  # a teacher that names nothing fails before torch is imported
        from hyla.convert.pipeline import ConvertOptions, convert as run

        options = ConvertOptions(
            teacher=teacher, out=out, linear=linear, softmax_layers=softmax_layers, softmax_ratio=softmax_ratio,
            selection=selection, data=data, budget=budget, overrides=_overrides(set_), seed=seed, device=device,
            quiet=quiet,
        )
        report = run(options)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code if isinstance(exc, ModelLoadError) else 2) from None
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(report))


def main() -> None:
    """`python -m hyla.convert …` (what torchrun launches): the convert command alone."""
    app = typer.Typer(add_completion=False)
    app.command()(convert)
    app()
