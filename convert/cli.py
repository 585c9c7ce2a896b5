"""`hyla convert`: distil a softmax-attention teacher into a hybrid (see convert/README.md)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def _errors_as_one_line() -> Iterator[None]:
    """Bad input (`ValueError`, `OSError`) ends the command with one line on stderr and exit code 2
    (a model that cannot be loaded: its own code)."""
    try:
        yield
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code if isinstance(exc, ModelLoadError) else 2) from None


def _no_transformers_bars() -> None:
    """Quiet runs print log lines only: no bars for loading or saving weights either."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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
    extra_data: str = typer.Option(
        None, help="Training-only text: a corpus folder made by `hyla corpus` (held-out text stays from --data)."
    ),
    budget: str = typer.Option("quick", help=f"Preset of token counts / lrs / lengths: {', '.join(BUDGETS)}."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a budget field, e.g. --set stage2_tokens=2e6 --set seq_len=512 (repeatable)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast, fla kernels)."),
    seed: int = typer.Option(0, help="Seed of the new parameters and of the data order."),
    nproc: int = typer.Option(1, min=1, help="Processes (one per GPU, or CPU processes with gloo); launches torchrun."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of progress bars."),
    stage1_from: str = typer.Option(
        None, help="A conversion that finished stage 1 to take the stage-1 student, layer probes and teacher "
        "reference from (same teacher, data, seed and stage-1/probe budget; K, method and stage-2 budget may differ).",
    ),
) -> None:
    """Convert TEACHER into a hybrid: data, stage 1, layer selection, stage 2, (stage 3), export.

    Every step persists into OUT; rerunning the same command resumes where it stopped, and is a
    no-op once the conversion is done.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        args = [f"--teacher={teacher}", f"--out={out}", f"--linear={linear}", f"--softmax-ratio={softmax_ratio}",
                f"--selection={selection}", f"--data={data}", f"--budget={budget}", f"--device={device}",
                f"--seed={seed}", *(f"--set={s}" for s in set_), *(["--quiet"] if quiet else []),
                *([f"--softmax-layers={softmax_layers}"] if softmax_layers is not None else []),
                *([f"--extra-data={extra_data}"] if extra_data else []),
                *([f"--stage1-from={stage1_from}"] if stage1_from else [])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hyla.convert", *args]
        raise typer.Exit(subprocess.call(cmd))
    with _errors_as_one_line():
        resolve(teacher)  # a teacher that names nothing fails before torch is imported
        from hyla.convert.pipeline import ConvertOptions, convert as run

        if quiet:
            _no_transformers_bars()

        options = ConvertOptions(
            teacher=teacher, out=out, linear=linear, softmax_layers=softmax_layers, softmax_ratio=softmax_ratio,
            selection=selection, data=data, extra_data=extra_data, budget=budget, overrides=_overrides(set_),
            seed=seed, device=device, quiet=quiet, stage1_from=stage1_from,
        )
        report = run(options)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(report))


def corpus(
    teacher: str = typer.Option(..., help="Teacher that writes the samples: alias, HF dir, hub id or .gguf file."),
    tokens: int = typer.Option(2_000_000, min=1, help="Tokens to reach (prompt + continuation); more resumes."),
    out: Path = typer.Option(None, help="Corpus folder [default: under the hyla cache, keyed by the settings]."),
    data: str = typer.Option("default", help="Real text the prompts are cut from (a --data spec of hyla convert)."),
    prompt_tokens: int = typer.Option(64, min=1, help="Tokens of real text each sample starts from."),
    max_new_tokens: int = typer.Option(448, min=1, help="Tokens sampled after the prompt (EOS ends earlier)."),
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass."),
    round_size: int = typer.Option(64, min=1, help="Prompts per round (the unit of resumption)."),
    seed: int = typer.Option(0, help="Seed of the prompts and of the sampling."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    dtype: str = typer.Option("auto", help="Weights dtype; auto: bfloat16 on CUDA, float32 on CPU."),
    cache_memory: str = typer.Option("2GiB", help="KV + state cache budget of the engine."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Sample a training corpus from the teacher with hyla's engine (cached, resumable); use it with
    `hyla convert --extra-data FOLDER`."""
    from tqdm import tqdm

    from hyla.convert.data import read_documents
    from hyla.convert.generated import GeneratedCorpus, SamplingPlan, engine_sampler
    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig
    from hyla.runtime.loading import default_dtype

    with _errors_as_one_line():
        plan = SamplingPlan(teacher=teacher, tokens=tokens, data=data, prompt_tokens=prompt_tokens,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            round_size=round_size, seed=seed)
        folder = out or plan.default_folder()
        corpus = GeneratedCorpus(folder, plan)
        if not corpus.done:
            resolve(teacher)
            if quiet:
                _no_transformers_bars()
            if dtype == "auto":
                dtype = default_dtype(device)
            length = prompt_tokens + max_new_tokens
            engine = LLMEngine.from_config(EngineConfig(
                model=teacher, device=device, dtype=dtype, max_num_seqs=round_size, max_model_len=length,
                max_num_batched_tokens=max(length, 4096), cache_memory=cache_memory, enable_prefix_caching=False,
            ))
            docs = read_documents(data, tokens)
            with tqdm(total=tokens, initial=min(tokens, corpus.meta["tokens"]), unit="tok", disable=quiet,
                      desc="corpus") as bar:
                corpus.build(docs, engine.tokenizer, engine_sampler(engine), bar.update)
    m = corpus.meta
    typer.echo(f"{folder}: {m['samples']:,} samples, {m['tokens']:,} tokens, {m['dropped']:,} dropped "
               f"({m['rounds']} rounds)")


def main() -> None:
    """`python -m hyla.convert …` (what torchrun launches): the convert command alone."""
    app = typer.Typer(add_completion=False)
    app.command()(convert)
    app()
