"""Sampling filters, seeded generators and logprob entries."""

from __future__ import annotations

import torch

from hyla.runtime.sampler import filter_logits, sample, token_logprobs
from hyla.runtime.sampling_params import SamplingParams


def logits_rows() -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0))


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = logits_rows()
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
              SamplingParams(temperature=1e-4)]
    gens = [None] + [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample(logits, params, gens) == best


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(row, 1.0, 2, 1.0)) == [0, 1]
    assert kept(filter_logits(row, 1.0, 0, 0.5)) == [0]
    assert kept(filter_logits(row, 1.0, 0, 0.75)) == [0, 1]
    assert kept(filter_logits(row, 1.0, 0, 0.9)) == [0, 1, 2]
    assert kept(filter_logits(row, 1.0, -1, 1.0)) == [0, 1, 2, 3]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].expand(4000, -1)
    params = [SamplingParams(temperature=1.0)] * 4000
    draw = lambda seed: sample(logits, params, [torch.Generator().manual_seed(seed)] * 4000)  # noqa: E731
    first = draw(3)
    assert first == draw(3) and first != draw(4)
    freq = torch.bincount(torch.tensor(first), minlength=3).float() / 4000
    assert (freq - probs).abs().max() < 0.03
    hot = sample(logits, [SamplingParams(temperature=5.0)] * 4000, [torch.Generator().manual_seed(3)] * 4000)
    assert torch.bincount(torch.tensor(hot), minlength=3)[2] > 4000 * 0.2  # flatter at high temperature


def test_token_logprobs_ranks_and_top_n() -> None:
    lp = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0, 0.0]), -1)
    entry = token_logprobs(lp, 0, 2)
    assert entry[0] == (float(lp[0]), 3)
    assert entry[1][1] == 1 and entry[2][1] == 2 and len(entry) == 3
    assert token_logprobs(lp, 1, 2) == {1: (float(lp[1]), 1), 2: (float(lp[2]), 2)}
    assert token_logprobs(lp, 3, 0) == {3: (float(lp[3]), 4)}
