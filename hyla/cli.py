"""The `hyla` command: one CLI over convert, runtime, serve and evals."""

import typer

from hyla.runtime.cli import generate, info

app = typer.Typer(
    help="Distil a softmax-attention LM into a hybrid, serve it, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench = typer.Typer(help="Benchmarks: offline engine throughput, serving load tests.", no_args_is_help=True)

app.command()(info)
app.command()(generate)
app.add_typer(bench, name="bench")
