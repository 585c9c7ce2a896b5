"""Speed of the stage-2 distillation step: fla's kernels against the PyTorch reference, on one device.

    python benchmarks/train_step.py --shape smollm2-135m --softmax-layers 8 --batch 16 --seq-len 1024 --out train_step.json

A random-weight teacher of the shape and its student (`--softmax-layers` evenly spaced softmax
layers, the rest Gated DeltaNet) run stage 2 as `hyla convert` does (teacher forward, KL, backward
replayed from a CUDA graph, clipping, fused AdamW) for `--steps` steps; the rate is the one the
conversion reports, after the first tenth of the steps. Each backend runs in a process of its own:
`fla` as the machine allows (its log says whether fla trains there), `pytorch` with
`HYLA_FLA_TRAINING=0`. The first fla run on a machine autotunes fla's kernels for minutes (kept in
`TRITON_CACHE_DIR`). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

BACKENDS = {"fla": "1", "pytorch": "0"}


def measure(shape: str, softmax_layers: int, batch: int, seq_len: int, steps: int, device: str) -> dict:
    """Stage 2 as the conversion runs it (`run_stage2`), in this process (its backend chosen by the
    environment), on random blocks; its rate once warm as the conversion reports it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyla.convert.data import BatchStream
    from hyla.convert.distributed import Dist
    from hyla.convert.loop import LoopSettings
    from hyla.convert.stage2 import run_stage2
    from hyla.convert.students import make_student
    from hyla.runtime.bench_models import SHAPES, hybrid_layer_types
    from hyla.runtime.ops.fla_backend import training_kernels

    dev = torch.device(device)
    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    teacher = LlamaForCausalLM(config).to(dev, dtype).eval().requires_grad_(False)
    types = hybrid_layer_types(config.num_hidden_layers, softmax_layers / config.num_hidden_layers)
    student = make_student(teacher, [i for i, t in enumerate(types) if t == "attention"], "gdn", seed=0).to(dev)
    blocks = torch.randint(0, config.vocab_size, (4 * batch, seq_len), generator=torch.Generator().manual_seed(0))
    result = run_stage2("stage 2", teacher, student, BatchStream(blocks, batch, seed=0), 1e-4, 7e-6, 4096,
                        LoopSettings(steps, Dist(device=dev), quiet=True))
    return {
        "mixer_kernels": training_kernels("gdn", dev),
        "graphed": result.graphed,
        "seconds": round(result.seconds, 2),
        "step_ms": round(batch * seq_len / result.steady_tokens_per_s * 1e3, 2),
        "tokens_per_s": round(result.steady_tokens_per_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help="teacher shape (hyla.runtime.bench_models.SHAPES)")
    parser.add_argument("--softmax-layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50,
                        help="steps; the rate leaves out the first tenth (graph capture, autotuning)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="fla,pytorch", help="comma-separated: fla, pytorch")
    parser.add_argument("--out", default="train_step.json")
    parser.add_argument("--one", choices=sorted(BACKENDS), help=argparse.SUPPRESS)  # a backend's own process
    args = parser.parse_args()
    from hyla.runtime.bench_models import SHAPES

    if args.shape not in SHAPES:
        parser.error(f"unknown shape {args.shape!r}; choose from {sorted(SHAPES)}")
    layers = SHAPES[args.shape]["num_hidden_layers"]
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the rate leaves out the first)")
    if not 0 < args.softmax_layers < layers:
        parser.error(f"--softmax-layers must be between 1 and {layers - 1} for {args.shape}")
    point = (args.shape, args.softmax_layers, args.batch, args.seq_len, args.steps, args.device)
    if args.one:
        print(json.dumps(measure(*point)))
        return

    rows = {}
    for backend in args.backends.split(","):
        env = {**os.environ, "HYLA_FLA_TRAINING": BACKENDS[backend]}
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", backend], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{backend} failed:\n{done.stderr[-3000:]}")
        rows[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"stage-2 step, {args.shape}, {args.softmax_layers} softmax layers, {args.batch} x {args.seq_len} tokens, "
          f"{args.device}")
    print("| backend | mixers on | graphed | step ms | tokens/s |")
    print("|---|---|---|---|---|")
    for backend, r in rows.items():
        print(f"| {backend} | {r['mixer_kernels']} | {r['graphed']} | {r['step_ms']} | {r['tokens_per_s']:,.0f} |")
    if {"fla", "pytorch"} <= rows.keys():
        print(f"fla / pytorch: {rows['fla']['tokens_per_s'] / rows['pytorch']['tokens_per_s']:.2f}x")
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args) | {"one": None}, "results": rows}, f, indent=2)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
