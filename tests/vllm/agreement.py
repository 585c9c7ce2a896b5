"""How closely vLLM's answers must match hyla's: equal greedy tokens up to bf16 near-ties, and
prompt logprobs within bf16 resolution."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.vllm.tiny_hybrid import teacher_forced_logits

BF16_EPS = 2.0**-7
"""Spacing of bf16 numbers relative to their magnitude (7 stored mantissa bits)."""
ULPS = 2.0
"""Two implementations rounding differently through a few bf16 layers end up a couple of ulps apart."""


def bf16_resolution(x: torch.Tensor) -> torch.Tensor:
    """ULPS bf16 spacings at |x| (at least at 1)."""
    return ULPS * BF16_EPS * x.abs().clamp_min(1.0)


def assert_greedy_agrees(model_dir: Path, prompt: list[int], expected: list[int], got: list[int]) -> None:
    """`got` equals hyla's greedy `expected`, except from a step where hyla's own teacher-forced top-2
    logits are closer than bf16 resolution (a near-tie either implementation may break either way)."""
    assert len(got) == len(expected)
    step = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if step is None:
        return
    logits = teacher_forced_logits(model_dir, prompt + expected)[len(prompt) - 1 + step]
    top2 = logits.topk(2).values
    gap, limit = (top2[0] - top2[1]).item(), bf16_resolution(top2[0]).item()
    assert gap <= limit, (
        f"diverged at step {step} ({expected[step]} vs {got[step]}) where hyla's top-2 gap {gap:.4f} "
        f"exceeds bf16 resolution {limit:.4f}"
    )


def assert_prompt_logprobs_agree(model_dir: Path, ids: list[int], got: list[float]) -> None:
    """vLLM's prompt logprobs (for ids[1:]) equal hyla's teacher-forced ones within the bf16
    resolution of that position's largest logit (a logprob is a logit minus a logsumexp)."""
    logits = teacher_forced_logits(model_dir, ids)[:-1]
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    excess = (torch.tensor(got) - expected).abs() / bf16_resolution(logits.max(-1).values)
    worst = int(excess.argmax())
    assert excess[worst] <= 1, (
        f"logprob of token {worst + 1}: vLLM {got[worst]:.4f}, hyla {expected[worst].item():.4f}"
    )
