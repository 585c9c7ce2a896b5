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
    assert cuda["stages"]["stage1"]["graphed"] and cuda["stages"]["stage2"]["graphed"]
    assert cuda["stages"]["stage2"]["mixer_kernels"].startswith(("fla (", "pytorch (fla refused"))

    with safe_open(tmp_path / "cuda" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is no dict)
    model = load_model(tmp_path / "cuda", dtype=torch.bfloat16, device="cuda")
    out = model.generate(torch.tensor([[5, 6, 7]], device="cuda"), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)


def test_graphed_training_steps_match_eager_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyla.convert.data import BatchStream
    from hyla.convert.distributed import Dist
    from hyla.convert.loop import LoopSettings
    from hyla.convert.stage2 import run_stage2
    from hyla.convert.students import make_student
    from tests.tiny_models import tiny_teacher

    dev = torch.device("cuda")
    teacher = tiny_teacher("llama", 4, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    teacher = teacher.to(dev).requires_grad_(False)
    blocks = torch.randint(0, 128, (40, 96), generator=torch.Generator().manual_seed(int(torch.seed() % 2**31)))
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("HYLA_TRAIN_GRAPHS", switch)
        student = make_student(teacher, [1], "gdn", seed=0).to(dev)
        result = run_stage2(
            "stage 2", teacher, student, BatchStream(blocks, 4, seed=1), 1e-3, 1e-4, 64,
            LoopSettings(steps=8, dist=Dist(device=dev), warmup=2, quiet=True),
        )
        runs[switch] = (result, torch.cat([p.detach().flatten() for p in student.parameters()]))
    (graphed, graphed_params), (eager, eager_params) = runs["1"], runs["0"]
    assert graphed.graphed and not eager.graphed
    losses = [torch.tensor([loss for _, loss in r.curve]) for r in (graphed, eager)]
    assert len(set(losses[1].tolist())) == 8  # eight different batches, eight different losses
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(graphed_params, eager_params, rtol=0, atol=2e-3)


def test_fla_training_turned_off_leaves_training_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyla.runtime.ops import fla_backend, fla_modules

    dev = torch.device("cuda")
    monkeypatch.setenv("HYLA_FLA_TRAINING", "0")
    fla_backend.trains.cache_clear()
    try:
        assert not fla_backend.trains("gdn", dev)
        assert fla_backend.training_kernels("gdn", dev) == "pytorch (HYLA_FLA_TRAINING=0)"
        with torch.enable_grad():
            assert not fla_modules.applies(torch.zeros(2, device=dev))
    finally:
        fla_backend.trains.cache_clear()
