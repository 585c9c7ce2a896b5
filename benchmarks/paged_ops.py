"""Kernel times of the paged attention and state-decode ops against their floors, at Llama-3.2-1B shapes.

Decode and state steps are compared with the time to read (and write) their bytes at peak HBM
bandwidth, prefill with bf16 dense tensor-core peak. Times are per call from CUDA-graph replays
(no launch overhead) with L2 flushed before every call. Needs a CUDA device.

    python benchmarks/paged_ops.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from hyla.runtime.ops import paged_attention as pa
from hyla.runtime.ops.state_decode import gdn_decode_, gla_decode_, short_conv_decode_

HBM_TB_S = 4.8  # H200
PEAK_TFLOPS = 790.0  # H200 dense bf16
HQ, HKV, D, BLOCK = 32, 8, 64, 16
DT = torch.bfloat16


def gpu_us(fn, reps: int = 10) -> float:
    """Microseconds per call of ``fn``: graph of (L2 flush, fn) x reps minus a graph of the flushes alone."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()

    def replay_ms(with_fn: bool) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        best = math.inf
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        return best

    return (replay_ms(True) - replay_ms(False)) / reps * 1e3


def pool(lens: list[int], head_dim: int = D, bound: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A KV pool with each sequence's blocks scattered at random, and block tables addressing ``bound`` tokens."""
    blocks = [math.ceil(n / BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks), device="cuda").int()
    width = max(*blocks, math.ceil(bound / BLOCK))
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for n, nb in enumerate(blocks):
        tables[n, :nb] = perm[used : used + nb]
        used += nb
    k = torch.randn(sum(blocks) * BLOCK, HKV, head_dim, device="cuda", dtype=DT)
    return k, torch.randn_like(k), tables


def bench_decode(B: int, ctx: int, bound: int) -> dict:
    k, v, tables = pool([ctx] * B, bound=bound)
    q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ws = torch.empty(pa.decode_workspace_numel(B, HQ, HKV, D, bound), device="cuda")
    us = gpu_us(lambda: pa.paged_decode_attention(
        q, k, v, tables, lens, D**-0.5, out, max_context_len=bound, block_size=BLOCK, workspace=ws
    ))
    nbytes = 2 * k[: B * ctx].numel() * k.element_size() + 2 * q.numel() * q.element_size()
    return row("decode", f"B={B} ctx={ctx} bound={bound}", us, nbytes=nbytes)


def bench_prefill(B: int, L: int, Hq: int, head_dim: int, configs: list) -> list[dict]:
    k, v, tables = pool([L] * B, head_dim)
    q = torch.randn(B * L, Hq, head_dim, device="cuda", dtype=DT)
    cu = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * L
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    flops = 4 * Hq * head_dim * B * L * (L + 1) / 2
    shape = f"{B}x{L} Hq={Hq} Hkv={HKV} D={head_dim}"
    rows = []
    for cfg in configs:
        us = gpu_us(lambda: pa._prefill_triton(q, k, v, tables, cu, lens, head_dim**-0.5, L, BLOCK, config=cfg))
        rows.append(row("prefill", f"{shape} cfg={cfg}", us, flops=flops))
    qd = q.view(B, L, Hq, head_dim).transpose(1, 2)
    kd = torch.randn(B, Hq, L, head_dim, device="cuda", dtype=DT)
    us = gpu_us(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True))
    rows.append(row("sdpa dense (baseline)", shape, us, flops=flops))
    return rows


def bench_states(B: int, H: int, K: int) -> list[dict]:
    slots = 2 * B
    idx = torch.randperm(slots, device="cuda")[:B]
    state = torch.randn(slots, H, K, K, device="cuda")
    q, k = (F.normalize(torch.randn(B, H, K, device="cuda"), dim=-1).to(DT) for _ in range(2))
    v = torch.randn(B, H, K, device="cuda", dtype=DT)
    g = -torch.rand(B, H, device="cuda")
    beta = torch.rand(B, H, device="cuda")
    gk = -torch.rand(B, H, K, device="cuda")
    state_bytes = 2 * B * H * K * K * 4
    C, W = 3 * H * K, 4
    x = torch.randn(B, C, device="cuda", dtype=DT)
    weight = torch.randn(C, W, device="cuda", dtype=DT)
    conv = torch.randn(slots, C, W - 1, device="cuda", dtype=DT)
    shape = f"B={B} H={H} D={K}"
    return [
        row("gdn_decode_", shape, gpu_us(lambda: gdn_decode_(q, k, v, g, beta, state, idx, K**-0.5)), nbytes=state_bytes),
        row("gla_decode_", shape, gpu_us(lambda: gla_decode_(q, k, v, gk, state, idx, K**-0.5)), nbytes=state_bytes),
        row("short_conv_decode_", f"B={B} C={C} W={W}", gpu_us(lambda: short_conv_decode_(x, weight, conv, idx)),
            nbytes=2 * conv[:B].numel() * 2 + 2 * x.numel() * 2),
    ]


def row(op: str, shape: str, us: float, nbytes: float | None = None, flops: float | None = None) -> dict:
    r = {"op": op, "shape": shape, "us": us}
    if nbytes is not None:
        r["floor_us"] = nbytes / (HBM_TB_S * 1e12) * 1e6
        r["TB/s"] = nbytes / (us * 1e-6) / 1e12
    if flops is not None:
        r["TFLOP/s"] = flops / (us * 1e-6) / 1e12
        r["peak_frac"] = r["TFLOP/s"] / PEAK_TFLOPS
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--prefill-sweep", action="store_true", help="time extra prefill tile configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [bench_decode(B, ctx, ctx) for B in (1, 32, 128) for ctx in (4096, 16384)]
    rows += [bench_decode(32, 4096, 131072), bench_decode(128, 4096, 131072)]
    configs64 = [pa.PREFILL_CONFIGS[64]]
    configs128 = [pa.PREFILL_CONFIGS[128]]
    if args.prefill_sweep:
        configs64 += [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)]
        configs128 += [(128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3)]
    rows += bench_prefill(32, 4096, HQ, D, configs64)
    rows += bench_prefill(8, 4096, 16, 128, configs128)
    rows += bench_states(128, 32, 64)
    print(f"{'op':<22} {'shape':<48} {'us':>9} {'floor_us':>9} {'TB/s':>6} {'TFLOP/s':>8}")
    for r in rows:
        floor = f"{r['floor_us']:9.1f} {r['TB/s']:6.2f}" if "floor_us" in r else " " * 16
        tflops = f"{r['TFLOP/s']:8.1f}" if "TFLOP/s" in r else ""
        print(f"{r['op']:<22} {r['shape']:<48} {r['us']:9.1f} {floor} {tflops}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
