"""Time of the CPU prefill-attention kernel over the paged KV pool (bf16, AVX512-BF16 CPUs).

    python benchmarks/cpu_prefill_attention.py [--out cpu_prefill_attention.json]

Cases at SmolLM2-135M's head shape (9 query and 3 KV heads of 64): chunks after a long cached
prefix (few queries over many cached keys, as after a prefix-cache hit, where packing the cached
keys and values dominates) and fresh prompts. Prints ms per layer and GFLOP/s; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hyla.runtime.ops import cpu_kernels

HQ, HKV, D, BLOCK = 9, 3, 64, 16
CASES = [  # (sequences, queries per sequence, context per sequence)
    (8, 1, 1347), (8, 8, 1347), (8, 64, 1347), (1, 512, 512), (4, 512, 512), (1, 1347, 1347),
]


def time_case(sequences: int, queries: int, context: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    blocks = (context + BLOCK - 1) // BLOCK
    k_cache, v_cache = (torch.randn(sequences * blocks * BLOCK, HKV, D, generator=gen).bfloat16() for _ in range(2))
    tables = torch.arange(sequences * blocks, dtype=torch.int32).view(sequences, blocks)
    q = torch.randn(sequences * queries, HQ, D, generator=gen).bfloat16()
    cu = torch.arange(0, sequences * queries + 1, queries, dtype=torch.int32)
    lens = torch.full((sequences,), context, dtype=torch.int32)

    def call() -> torch.Tensor:
        return cpu_kernels.prefill_attention(q, k_cache, v_cache, tables, cu, lens, D**-0.5, BLOCK)

    for _ in range(3):
        call()
    began = time.perf_counter()
    for _ in range(reps):
        call()
    ms = (time.perf_counter() - began) / reps * 1e3
    flops = 4 * sequences * HQ * D * sum(context - queries + i + 1 for i in range(queries))
    return {"sequences": sequences, "queries": queries, "context": context, "ms": round(ms, 3),
            "gflop_s": round(flops / ms / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="cpu_prefill_attention.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if not cpu_kernels.prefill_supported(torch.zeros(1, HQ, D, dtype=torch.bfloat16)):
        raise SystemExit("the CPU prefill-attention kernel needs the hyla CPU kernels and AVX512-BF16")
    rows = [time_case(*case, reps=args.reps) for case in CASES]
    print(f"CPU prefill attention, {HQ} query / {HKV} KV heads of {D}, {torch.get_num_threads()} threads")
    print("| sequences | queries each | context | ms / layer | GFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sequences']} | {r['queries']} | {r['context']} | {r['ms']} | {r['gflop_s']} |")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
