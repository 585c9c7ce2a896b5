"""Sampling filters, seeded generators and logprob entries."""

from __future__ import annotations

import torch

from hyla.runtime.sampler import filter_logits, sample, uniform_noise


def logits_rows() -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0))


def draw(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         seeds: list[int] | None = None, positions: list[int] | None = None) -> list[int]:
    r = logits.shape[0]
    return sample(
        logits, torch.full((r,), temperature), torch.full((r,), top_k), torch.full((r,), top_p),
        torch.tensor(seeds if seeds is not None else [0] * r), torch.tensor(positions or list(range(r))),
    ).tolist()


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = logits_rows()
    best = logits.argmax(-1).tolist()
    assert draw(logits, temperature=0) == best
    assert draw(logits, top_k=1) == best
    assert draw(logits, top_p=1e-6) == best
    assert draw(logits, temperature=1e-4) == best
    mixed = sample(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0, 1, 0, 1]), torch.ones(4),
                   torch.zeros(4, dtype=torch.long), torch.arange(4)).tolist()
    assert mixed == best


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    row = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()  # noqa: E731
    one = torch.ones(1)
    k = lambda n: torch.tensor([n])  # noqa: E731
    assert kept(filter_logits(row, one, k(2), one)) == [0, 1]
    assert kept(filter_logits(row, one, k(0), one * 0.5)) == [0]
    assert kept(filter_logits(row, one, k(0), one * 0.75)) == [0, 1]
    assert kept(filter_logits(row, one, k(0), one * 0.9)) == [0, 1, 2]
    assert kept(filter_logits(row, one, k(-1), one)) == [0, 1, 2, 3]
    rows = torch.cat([row, row])  # per-row parameters in one batch
    both = filter_logits(rows, torch.ones(2), torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    assert kept(both[:1]) == [0, 1] and kept(both[1:]) == [0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].expand(4000, -1)
    positions = list(range(4000))
    first = draw(logits, seeds=[3] * 4000, positions=positions)
    assert first == draw(logits, seeds=[3] * 4000, positions=positions)
    assert first != draw(logits, seeds=[4] * 4000, positions=positions)
    # a row's draw depends on its own seed and position only, not on the rest of the batch
    assert draw(logits[:1], seeds=[3], positions=[17]) == [first[17]]
    freq = torch.bincount(torch.tensor(first), minlength=3).float() / 4000
    assert (freq - probs).abs().max() < 0.03
    across_seeds = draw(logits, seeds=list(range(4000)), positions=[5] * 4000)
    assert (torch.bincount(torch.tensor(across_seeds), minlength=3).float() / 4000 - probs).abs().max() < 0.03
    hot = draw(logits, temperature=5.0, seeds=[3] * 4000, positions=positions)
    assert torch.bincount(torch.tensor(hot), minlength=3)[2] > 4000 * 0.2  # flatter at high temperature


def test_uniform_noise_is_uniform_and_any_seed_works() -> None:
    seeds = torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    u = uniform_noise(seeds, torch.tensor([0, 1, 2, 3]), 20000)
    assert bool(((u > 0) & (u < 1)).all())
    assert (u.mean() - 0.5).abs() < 0.01 and (u.var() - 1 / 12).abs() < 0.005
    assert not torch.equal(u[0], u[1])


def test_noise_in_int32_has_the_bits_of_the_int64_hash() -> None:
    from hyla.runtime.sampler import _MASK32, _fmix32

    g = torch.Generator().manual_seed(1)
    seeds = torch.randint(-(2**63), 2**63 - 1, (16,), generator=g)
    positions = torch.randint(0, 2**20, (16,), generator=g)
    row = _fmix32((seeds & _MASK32) ^ _fmix32(((seeds >> 32) & _MASK32) ^ _fmix32(positions & _MASK32)))[:, None]
    cols = (torch.arange(3000) * 0x9E3779B1) & _MASK32
    h = _fmix32(_fmix32(row ^ cols) ^ row)
    assert torch.equal(uniform_noise(seeds, positions, 3000), ((h >> 8).float() + 0.5) / float(1 << 24))
    ids = torch.randint(0, 3000, (16, 40), generator=g)
    assert torch.equal(uniform_noise(seeds, positions, ids), uniform_noise(seeds, positions, 3000).gather(1, ids))


def _fresh_batch(rows: int, vocab: int, spread: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * spread
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.1
    top_k = torch.randint(0, 250, (rows,), generator=g) * (torch.rand(rows, generator=g) < 0.5)
    top_p = torch.where(torch.rand(rows, generator=g) < 0.7, torch.rand(rows, generator=g) * 0.9 + 0.05, 1.0)
    top_p = torch.where(top_k == 0, torch.clamp(top_p, max=0.95), top_p)  # every row filters
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=g)
    positions = torch.randint(0, 4096, (rows,), generator=g)
    return logits, temperature, top_k, top_p, seeds, positions


def test_candidate_sampling_draws_what_the_full_vocabulary_race_draws() -> None:
    from hyla.runtime.sampler import CANDIDATES, _sample_candidates, sample_full

    for seed in range(6):
        for spread in (6.0, 0.5):  # a peaked row's nucleus fits the candidates, a flat one's may not
            batch = _fresh_batch(64, 4 * CANDIDATES + 37, spread, seed)
            candidates, covered = _sample_candidates(*batch)
            full = sample_full(*batch)
            assert bool(covered.all()) == (spread > 1) and bool(covered.any())
            assert torch.equal(candidates[covered], full[covered])
            assert torch.equal(sample(*batch), full)
            for row in range(0, 64, 9):  # a row draws the same alone as in the batch
                assert sample(*(t[row : row + 1] for t in batch)).item() == full[row].item()


def test_an_unfiltered_row_takes_the_full_vocabulary() -> None:
    from hyla.runtime.sampler import CANDIDATES, _sample_candidates, sample_full

    batch = _fresh_batch(8, 2 * CANDIDATES, 6.0, 0)
    batch[2][3], batch[3][3] = 0, 1.0  # row 3: no top-k, no top-p
    _, covered = _sample_candidates(*batch)
    assert covered.tolist() == [True, True, True, False, True, True, True, True]
    assert torch.equal(sample(*batch), sample_full(*batch))
