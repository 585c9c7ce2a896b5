"""An all-softmax hybrid built from a teacher reproduces the teacher exactly."""

from __future__ import annotations

import pytest
import torch

from hyla.convert.transfer import hybrid_from_teacher


def _all_attention(teacher):
    return hybrid_from_teacher(teacher, ["attention"] * teacher.config.num_hidden_layers)


def test_all_attention_hybrid_matches_teacher(teacher) -> None:
    student = _all_attention(teacher)
    torch.manual_seed(1)
    ids = torch.randint(3, teacher.config.vocab_size, (3, 37))
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5


def test_left_padded_batch_matches_teacher(teacher) -> None:
    student = _all_attention(teacher)
    torch.manual_seed(2)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask).logits
        got = student(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-5


def test_generate_matches_teacher(teacher) -> None:
    student = _all_attention(teacher)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(student.generate(ids, **kw), teacher.generate(ids, **kw))


@pytest.mark.slow
def test_smollm2_all_attention_matches_teacher(smollm2) -> None:
    model, tok = smollm2
    student = _all_attention(model)
    ids = tok(["The quick brown fox jumps over the lazy dog.", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**ids).logits
        got = student(**ids).logits
    real = ids["attention_mask"].bool()
    # fp32 logits of magnitude ~20 over 30 layers: the CPU kernels sum in another order than HF
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4


def test_as_hybrid_keeps_teacher_logits(teacher) -> None:
    from hyla.runtime.loading import as_hybrid
    from hyla.runtime.model import HybridForCausalLM

    hybrid = as_hybrid(teacher)
    assert isinstance(hybrid, HybridForCausalLM)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert (hybrid(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-5
