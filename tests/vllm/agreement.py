"""How closely vLLM's answers must match hyla's: equal greedy tokens up to bf16 near-ties, and
prompt logprobs within bf16 resolution.

bf16 resolution at a position is how far bf16 rounding alone moves hyla's own logits there: the
largest |logit| difference between hyla's model in bf16 and in fp32, and at least one bf16 spacing
of the top logit. Two bf16 implementations of the same model differ by rounding, so they may
disagree that much and no more.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.vllm.tiny_hybrid import teacher_forced_logits

BF16_EPS = 2.0**-7
"""Spacing of bf16 numbers relative to their magnitude (7 stored mantissa bits)."""


def logits_and_resolution(model_dir: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """hyla's bf16 logits for `ids` and the bf16 resolution `[len(ids)]` at each position."""
    logits = teacher_forced_logits(model_dir, ids)
    drift = (logits - teacher_forced_logits(model_dir, ids, torch.float32)).abs().max(-1).values
    return logits, torch.maximum(drift, BF16_EPS * logits.max(-1).values.abs())


def assert_greedy_agrees(model_dir: Path, prompt: list[int], expected: list[int], got: list[int]) -> None:
    """`got` equals hyla's greedy `expected`, except from a step where hyla's teacher-forced top-2
    logits are closer than bf16 resolution (a near-tie either implementation may break either way);
    and every token of `got`, teacher-forced on `got` itself, is one hyla's model rates within bf16
    resolution of its top logit, so the continuation after a near-tie is checked too."""
    assert len(got) == len(expected)
    step = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if step is not None:
        logits, resolution = logits_and_resolution(model_dir, prompt + expected)
        top2 = logits[len(prompt) - 1 + step].topk(2).values
        gap, limit = (top2[0] - top2[1]).item(), resolution[len(prompt) - 1 + step].item()
        assert gap <= limit, (
            f"diverged at step {step} ({expected[step]} vs {got[step]}) where hyla's top-2 gap "
            f"{gap:.4f} exceeds bf16 resolution {limit:.4f}"
        )
    logits, resolution = (t[len(prompt) - 1 : -1] for t in logits_and_resolution(model_dir, prompt + got))
    shortfall = logits.max(-1).values - logits.gather(1, torch.tensor(got)[:, None])[:, 0]
    bad = (shortfall > resolution).nonzero().flatten().tolist()
    assert not bad, f"steps {bad} picked tokens hyla's model rates below its top logit by {shortfall[bad].tolist()}"


def assert_prompt_logprobs_agree(model_dir: Path, ids: list[int], got: list[float]) -> None:
    """vLLM's prompt logprobs (for ids[1:]) equal hyla's teacher-forced ones within the bf16
    resolution of their position."""
    logits, resolution = (t[:-1] for t in logits_and_resolution(model_dir, ids))
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    excess = (torch.tensor(got) - expected).abs() / resolution
    worst = int(excess.argmax())
    assert excess[worst] <= 1, (
        f"logprob of token {worst + 1}: vLLM {got[worst]:.4f}, hyla {expected[worst].item():.4f}"
    )
