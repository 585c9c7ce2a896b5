"""`hyla bench engine`: offline throughput of the engine vs HF `generate`, and cache capacity.

Throughput: the same random prompts (fixed length, EOS ignored, greedy) at each batch size, timed
end to end (prefill + decode), generated tokens per second. Capacity: how many sequences of
1k / 4k / 8k tokens fit in one cache budget for the all-softmax teacher and for a hybrid keeping
25 % softmax layers (evenly spaced, the rest Gated DeltaNet); it depends only on shapes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from hyla.runtime.cache_budget import REPORT_LENGTHS, fmt_bytes, max_concurrent, parse_memory
from hyla.runtime.config import HybridConfig
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.info import as_hybrid_config, cache_sizes, layer_pattern
from hyla.runtime.loading import load_config, load_model, load_tokenizer, parse_dtype
from hyla.runtime.sampling_params import SamplingParams


def hybrid_layer_types(num_layers: int, softmax_fraction: float = 0.25, linear: str = "gdn") -> list[str]:
    """`softmax_fraction` of the layers as softmax attention, evenly spaced; the others `linear`."""
    keep = max(1, round(num_layers * softmax_fraction))
    softmax = {round((i + 0.5) * num_layers / keep - 0.5) for i in range(keep)}
    return ["attention" if i in softmax else linear for i in range(num_layers)]


def capacity_table(config: HybridConfig, budget: int, dtype: torch.dtype, block_size: int = 16) -> list[dict]:
    """Max concurrent sequences per context length for the teacher, a 25 % hybrid and `config` itself."""
    teacher = HybridConfig(**{**config.to_dict(), "layer_types": ["attention"] * config.num_hidden_layers})
    hybrid = HybridConfig(**{**config.to_dict(), "layer_types": hybrid_layer_types(config.num_hidden_layers)})
    rows = []
    named = {"teacher (all softmax)": teacher, "25% softmax hybrid": hybrid}
    if config.linear_layers and layer_pattern(config) != layer_pattern(hybrid):
        named["this model"] = config
    for name, cfg in named.items():
        sizes = cache_sizes(cfg, kv_dtype=dtype, state_dtype=torch.float32)
        rows.append({
            "model": name,
            "layers": layer_pattern(cfg),
            "kv_bytes_per_token": sizes.kv_bytes_per_token,
            "state_bytes_per_sequence": sizes.state_bytes_per_sequence,
            **{f"max_seqs_{n}": max_concurrent(sizes, budget, n, block_size) for n in REPORT_LENGTHS},
        })
    return rows


def time_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return seconds


@torch.inference_mode()
def time_hf(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        do_sample=False, pad_token_id=pad_id,
    )
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + max_tokens
    return seconds


def bench_engine(
    model: str = typer.Argument(..., help="Model to load (converted hybrid dir, HF dir / hub id, .gguf, alias)."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    prompt_len: int = typer.Option(32, min=1, help="Prompt tokens per request."),
    max_tokens: int = typer.Option(32, min=1, help="Generated tokens per request (EOS ignored)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Weights / KV dtype."),
    cache_memory: str = typer.Option("2GiB", help="Cache budget (bytes, e.g. 2GiB, or a fraction of free memory)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also time HF generate on the same model."),
    out: Path = typer.Option(Path("bench_engine.json"), help="Where to write the JSON results."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or start-up report."),
) -> None:
    """Offline throughput (tokens/s) of the engine vs HF generate, and the capacity table."""
    sizes_list = [int(b) for b in batch_sizes.split(",") if b.strip()]
    torch_dtype = parse_dtype(dtype)
    tok = load_tokenizer(model)
    hf_model = load_model(model, torch_dtype, device)
    engine = LLMEngine(hf_model, tok, EngineConfig(
        model=model, device=device, dtype=dtype, cache_memory=cache_memory, max_num_seqs=max(sizes_list),
        max_num_batched_tokens=max(1024, prompt_len), max_model_len=prompt_len + max_tokens,
    ))
    if not quiet:
        typer.echo(engine.capacity_report, err=True)
    gen = torch.Generator().manual_seed(0)
    special = set(tok.all_special_ids)
    pool = [t for t in range(engine.model.config.vocab_size) if t not in special]
    prompts = [[pool[i] for i in torch.randint(len(pool), (prompt_len,), generator=gen).tolist()]
               for _ in range(max(sizes_list))]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    time_engine(engine, prompts[:2], 4)  # warm-up
    if hf:
        time_hf(hf_model, prompts[:2], 4, pad_id)
    throughput = []
    for b in tqdm(sizes_list, desc="bench", disable=quiet):
        row = {"batch": b, "engine_tok_s": b * max_tokens / time_engine(engine, prompts[:b], max_tokens)}
        if hf:
            row["hf_tok_s"] = b * max_tokens / time_hf(hf_model, prompts[:b], max_tokens, pad_id)
            row["speedup"] = row["engine_tok_s"] / row["hf_tok_s"]
        throughput.append(row)
    budget = parse_memory(cache_memory, device)
    capacity = capacity_table(as_hybrid_config(load_config(model)), budget, torch_dtype)

    typer.echo(f"\nthroughput: {model}, {device} {dtype}, prompt {prompt_len} + {max_tokens} generated tokens, greedy")
    typer.echo(f"{'batch':>5}  {'engine tok/s':>12}" + (f"  {'HF tok/s':>9}  {'speedup':>7}" if hf else ""))
    for r in throughput:
        line = f"{r['batch']:>5}  {r['engine_tok_s']:>12.1f}"
        if hf:
            line += f"  {r['hf_tok_s']:>9.1f}  {r['speedup']:>6.2f}x"
        typer.echo(line)
    typer.echo(f"\ncapacity: max concurrent sequences in {fmt_bytes(budget)} ({dtype} KV, fp32 state, 16-token blocks)")
    typer.echo(f"{'model':<22} {'layers':<32} " + " ".join(f"{n:>6}" for n in REPORT_LENGTHS))
    for r in capacity:
        counts = " ".join(f"{r[f'max_seqs_{n}']:>6}" for n in REPORT_LENGTHS)
        typer.echo(f"{r['model']:<22} {r['layers']:<32} {counts}")
    result = {
        "model": model, "device": device, "dtype": dtype, "prompt_len": prompt_len, "max_tokens": max_tokens,
        "cache_memory_bytes": budget, "throughput": throughput, "capacity": capacity,
        "engine_report": engine.capacity_report,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(f"\nwrote {out}")
