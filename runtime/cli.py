"""`hyla info` and `hyla generate`: inspect and try any loadable model.

The model name is resolved, and a local model's weight files read back, before torch and
transformers are imported, so a name that names nothing or unreadable weights fail at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hyla.runtime.load_errors import ModelLoadError
from hyla.runtime.locate import resolve
from hyla.runtime.weights import checkpoint_shapes

if TYPE_CHECKING:
    import torch


def _resolve_readable(model: str) -> str:
    """`resolve(model)`, once a local model's weight files are found readable."""
    path = resolve(model)
    if Path(path).is_dir():
        checkpoint_shapes(Path(path))
    return path


def _dtype(name: str) -> torch.dtype:
    from hyla.runtime.loading import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dtype") from None


def info(
    model: str = typer.Argument(..., help="Converted hybrid dir, HF dir / hub id, .gguf file, or alias (smollm2-135m)."),
    dtype: str = typer.Option("bfloat16", help="Dtype used for the KV / conv cache sizes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, per-layer types, parameter count and cache bytes per token / per sequence."""
    path = _resolve_readable(model)
    from hyla.runtime.info import describe
    from hyla.runtime.loading import check_model

    cache_dtype = _dtype(dtype)
    config = check_model(path)
    try:
        facts = describe(config, cache_dtype)
    except ValueError as exc:
        raise ModelLoadError(f"{model}: {exc}") from exc
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, int) and "bytes" in key:
            value = f"{value:,} B ({value / 1024:.1f} KiB)"
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        typer.echo(f"{key:<{width}}  {value}")
    typer.echo("layer letters: A softmax attention, D Gated DeltaNet, L GLA")


def generate(
    model: str = typer.Argument(..., help="Model to load (see `hyla info --help`)."),
    prompt: str = typer.Option("The capital of France is", help="Prompt text."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens to generate (greedy)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights dtype."),
) -> None:
    """Greedy generation with HF `generate` (reference path, no serving engine)."""
    path = _resolve_readable(model)
    import torch

    from hyla.runtime.loading import load_model, load_tokenizer

    lm = load_model(path, _dtype(dtype), device)
    tok = load_tokenizer(path)
    if chat and tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    typer.echo(tok.decode(ids[0], skip_special_tokens=False) + tok.decode(new, skip_special_tokens=True))
    typer.echo(f"[{len(new)} tokens in {seconds:.2f} s]", err=True)
