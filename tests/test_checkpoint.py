"""Hybrids save as HF checkpoints and load back through AutoModelForCausalLM."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import hyla  # noqa: F401  (registers the hybrid with the Auto classes)
from hyla.convert.transfer import hybrid_from_teacher
from tests.tiny_models import tiny_teacher


def test_save_load_round_trip(tmp_path) -> None:
    teacher = tiny_teacher("qwen2")
    student = hybrid_from_teacher(teacher, ["gdn", "attention", "gla", "gdn"])
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hyla_hybrid"
    assert config["layer_types"] == ["gdn", "attention", "gla", "gdn"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    ids = torch.randint(3, 128, (2, 23))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    for name, p in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_cached_decode_equals_full_forward() -> None:
    """Token-by-token decoding through the HF cache gives the logits of one full pass."""
    student = hybrid_from_teacher(tiny_teacher("llama"), ["gdn", "gla", "attention", "gdn"], seed=3)
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :17], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(17, 30):
            out = student(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padding_does_not_leak_into_linear_state() -> None:
    """A left-padded row gives the same logits as the same prompt alone."""
    student = hybrid_from_teacher(tiny_teacher("qwen3"), ["gdn", "attention", "gla", "gdn"], seed=4)
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        batched = student(ids, attention_mask=mask).logits[1, 5:]
        alone = student(ids[1:, 5:]).logits[0]
    assert (batched - alone).abs().max().item() <= 1e-5
