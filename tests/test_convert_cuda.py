"""The conversion on CUDA (bf16 autocast, fla kernels) against the same conversion on CPU (fp32)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hyla.convert.pipeline import ConvertOptions, convert
from hyla.runtime.loading import load_model
from tests.test_convert_helpers import ESSENTIAL, TINY_BUDGET, copy_corpus, teacher_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("convert_cuda")
    before = os.environ.get("HYLA_CACHE")
    os.environ["HYLA_CACHE"] = str(root / "cache")
    teacher_dir(root / "teacher", essential=ESSENTIAL)
    copy_corpus(root / "corpus.txt")
    overrides = dict(TINY_BUDGET[i + 1].split("=") for i in range(0, len(TINY_BUDGET), 2))
    out = {}
    try:
        for device in ("cpu", "cuda"):
            convert(ConvertOptions(
                teacher=str(root / "teacher"), out=root / device, data=str(root / "corpus.txt"), softmax_layers=1,
                overrides=overrides, device=device, quiet=True,
            ))
            out[device] = json.loads((root / device / "conversion_report.json").read_text())
            out[device]["dir"] = root / device
    finally:
        if before is None:
            os.environ.pop("HYLA_CACHE")
        else:
            os.environ["HYLA_CACHE"] = before
    return out


def test_cuda_conversion_selects_like_cpu_and_beats_the_transfer(reports: dict[str, dict]) -> None:
    cpu, cuda = reports["cpu"], reports["cuda"]
    assert cuda["selection"]["selected"] == cpu["selection"]["selected"] == [ESSENTIAL]
    scores = {d: {int(k): v["kl"] for k, v in r["selection"]["probes"][0].items()} for d, r in reports.items()}
    print("probe KL cpu", scores["cpu"], "cuda", scores["cuda"])
    assert min(scores["cuda"], key=scores["cuda"].get) == ESSENTIAL
    for layer, kl in scores["cpu"].items():
        assert abs(scores["cuda"][layer] - kl) <= 0.1 * kl + 0.05, (layer, kl, scores["cuda"][layer])
    held = cuda["heldout"]
    assert held["result"]["kl"] < 0.5 * held["untrained_transfer"]["kl"]
    assert cuda["stages"]["stage2"]["tokens_per_s"] > 0


def test_cuda_checkpoint_is_bf16_and_generates(reports: dict[str, dict]) -> None:
    path: Path = reports["cuda"]["dir"]
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict) == {"BF16"}
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    out = model.generate(torch.tensor([[5, 6, 7]], device="cuda"), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)
