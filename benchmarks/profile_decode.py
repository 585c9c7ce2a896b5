"""Profile steady-state decode steps of the engine: kernels per step and the GPU-busy fraction.

    python benchmarks/profile_decode.py --shape llama-3.2-1b --batch-sizes 1,32 --context 4096 --out profile.json

For the teacher and its 25 % hybrid (random weights, bf16), runs `--steps` decode steps under
torch.profiler after warm-up and reports per step: wall ms, GPU kernel ms (sum of kernel
durations), busy fraction (kernel time / wall time), kernels executed and host-side launches
(CUDA graph launches count once).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hyla.runtime.bench_models import bench_configs, random_model, shape_config
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams


def profile_point(config, batch: int, context: int, steps: int, eager: bool) -> dict:
    model = random_model(config, "cuda", torch.bfloat16)
    engine = LLMEngine(model, None, EngineConfig(
        model="random", device="cuda", dtype="bfloat16", max_num_seqs=batch, max_model_len=context + steps + 16,
        max_num_batched_tokens=max(context, 8192), cache_memory="0.6", enforce_eager=eager))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 12, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(10, 10000, (context,), generator=g).tolist(), params)
    while not engine.scheduler.running or any(
        s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running + engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                 "cuLaunchKernelEx", "cudaGraphLaunch")]
    gpu = sum(e.device_time for e in kernels) / 1e3 / steps
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    del engine, model
    torch.cuda.empty_cache()
    return {"batch": batch, "context": context, "graphs": not eager, "step_ms": wall * 1e3, "gpu_ms": gpu,
            "busy": gpu / (wall * 1e3), "kernels_per_step": len(kernels) / steps,
            "launches_per_step": len(launches) / steps,
            "top_kernels_ms": {name[:90]: round(ms, 4) for name, ms in top}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eager", action="store_true", help="Also profile without CUDA graphs.")
    parser.add_argument("--out", default="profile_decode.json")
    args = parser.parse_args()
    rows = []
    for name, config in bench_configs(shape_config(args.shape)).items():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            for eager in ((False, True) if args.eager else (False,)):
                row = {"model": name, **profile_point(config, b, args.context, args.steps, eager)}
                rows.append(row)
                print(f"{name:<10} B={b:<4} ctx={args.context:<6} {'eager' if eager else 'graphs'}: "
                      f"step {row['step_ms']:.2f} ms, GPU {row['gpu_ms']:.2f} ms, busy {row['busy']:.0%}, "
                      f"{row['kernels_per_step']:.0f} kernels, {row['launches_per_step']:.0f} launches per step",
                      flush=True)
                for kernel, ms in row["top_kernels_ms"].items():
                    print(f"    {ms:7.3f} ms  {kernel}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
