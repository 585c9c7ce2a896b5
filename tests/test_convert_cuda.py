"""The conversion on CUDA (bf16 autocast, fla kernels) against the same conversion on CPU (fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hyla.convert.pipeline import ConvertOptions, convert
from hyla.runtime.loading import load_model
from tests.test_convert_helpers import ESSENTIAL, copy_corpus, teacher_dir, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_conversion_selects_like_cpu_and_exports_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYLA_CACHE", str(tmp_path / "cache"))
    teacher_dir(tmp_path / "teacher", essential=ESSENTIAL)
    copy_corpus(tmp_path / "corpus.txt")
    reports = {}
    for device in ("cpu", "cuda"):
        convert(ConvertOptions(
            teacher=str(tmp_path / "teacher"), out=tmp_path / device, data=str(tmp_path / "corpus.txt"),
            softmax_layers=1, overrides=tiny_overrides(), device=device, quiet=True,
        ))
        reports[device] = json.loads((tmp_path / device / "conversion_report.json").read_text())

    cpu, cuda = reports["cpu"], reports["cuda"]
    assert cuda["selection"]["selected"] == cpu["selection"]["selected"] == [ESSENTIAL]
    scores = {d: {int(k): v["kl"] for k, v in r["selection"]["probes"][0].items()} for d, r in reports.items()}
    print("probe KL cpu", scores["cpu"], "cuda", scores["cuda"])
    assert min(scores["cuda"], key=scores["cuda"].get) == ESSENTIAL
    for layer, kl in scores["cpu"].items():
        assert abs(scores["cuda"][layer] - kl) <= 0.1 * kl + 0.05, (layer, kl, scores["cuda"][layer])
    held = cuda["heldout"]
    assert held["result"]["kl"] < held["untrained_transfer"]["kl"]
    assert cuda["stages"]["stage2"]["tokens_per_s"] > 0
    assert cuda["stages"]["stage2"]["mixer_kernels"].startswith(("fla (", "pytorch (fla refused"))

    with safe_open(tmp_path / "cuda" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is no dict)
    model = load_model(tmp_path / "cuda", dtype=torch.bfloat16, device="cuda")
    out = model.generate(torch.tensor([[5, 6, 7]], device="cuda"), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)


def test_the_graphed_teacher_forward_matches_the_eager_one() -> None:
    from hyla.convert.graphed import GraphedForward
    from hyla.convert.students import autocast, final_hidden
    from tests.tiny_models import tiny_teacher

    teacher = tiny_teacher("llama", 3).to("cuda", torch.bfloat16)
    graphed = GraphedForward(lambda ids: final_hidden(teacher, ids))
    for step, shape in enumerate([(4, 96), (4, 96), (2, 50), (4, 96)]):
        ids = torch.randint(0, 128, shape, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        with torch.no_grad(), autocast(torch.device("cuda")):
            got, want = graphed(ids), final_hidden(teacher, ids)
        assert not graphed.eager and graphed.static_in.shape == (4, 96)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
