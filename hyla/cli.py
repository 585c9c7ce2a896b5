"""The `hyla` command: one CLI over convert, runtime, serve and evals."""

import typer

from hyla.convert.cli import convert
from hyla.evals.cli import bench_serve, eval_app
from hyla.runtime.bench import bench_engine
from hyla.runtime.cli import generate, info
from hyla.serve.cli import serve

app = typer.Typer(
    help="Distil a softmax-attention LM into a hybrid, serve it, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench = typer.Typer(help="Benchmarks: offline engine throughput, serving load tests.", no_args_is_help=True)

app.command()(info)
app.command()(generate)
app.command()(serve)
app.command()(convert)
app.add_typer(bench, name="bench")
bench.command("engine")(bench_engine)
app.add_typer(eval_app, name="eval")
bench.command("serve")(bench_serve)
