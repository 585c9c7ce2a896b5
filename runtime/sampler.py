"""Choosing the next token for a whole batch on the logits' device: greedy, temperature, top-k, top-p.

Random draws are counter-based: the noise of row r depends only on that sequence's seed and the
position it samples for, so a seeded sequence draws the same tokens whatever else is in the batch,
after preemption, on any device. The draw is the exponential race (argmax of p / E, E ~ Exp(1)),
which picks token v with probability p_v.

In a row that filters (top-k, or a top-p nucleus) the tokens that can win usually lie among its
`CANDIDATES` most likely, which are then all that is sorted and given noise (a full sort and
full-vocabulary noise cost ~180 ms a step for 64 rows of a 49k vocabulary on two CPU cores). Rows
without a filter, or whose nucleus reaches past them, take the full path on their own; both paths
draw the same token (barring a rounding difference exactly at a nucleus edge), so a row's draw
does not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix of int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _fmix32_int32(h: torch.Tensor) -> torch.Tensor:
    """`_fmix32` on int32 tensors holding the same 32 bits (products wrap; shifts masked to be logical):
    half the memory and no masking, for the `[R, V]` noise."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _as_int32(0x85EBCA6B)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _as_int32(0xC2B2AE35)
    return h ^ ((h >> 16) & 0xFFFF)


def _as_int32(value: int | torch.Tensor) -> int | torch.Tensor:
    """The int32 with the same 32 bits as `value` in [0, 2^32)."""
    if isinstance(value, int):
        return value - (1 << 32) if value >= 1 << 31 else value
    return (value - ((value >> 31) << 32)).int()


CANDIDATES = 256
"""Tokens per row the filtered fast path sorts and draws among."""


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, columns: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), a pure function of each row's (seed, position) and the column: `[R, vocab]`
    for an int `columns` (the vocabulary size), else at the given `[R, C]` token ids."""
    seeds, positions = seeds.long(), positions.long()
    row = _fmix32((seeds & _MASK32) ^ _fmix32(((seeds >> 32) & _MASK32) ^ _fmix32(positions & _MASK32)))
    if isinstance(columns, int):
        columns = torch.arange(columns, device=seeds.device, dtype=torch.long)
    row, cols = _as_int32(row)[:, None], _as_int32((columns.long() * 0x9E3779B1) & _MASK32)
    h = _fmix32_int32(_fmix32_int32(row ^ cols) ^ row)
    return (((h >> 8) & 0xFFFFFF).float() + 0.5) / float(1 << 24)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Rows `[R, V]` scaled by their temperature, everything outside top-k / the top-p nucleus at -inf.

    `temperature` `[R]` (> 0), `top_k` `[R]` (0 or -1: off), `top_p` `[R]` (1: off).
    """
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = _top_k_bound(top_k, vocab)
    if bool((k < vocab).any()) or bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = _dropped(probs, probs.cumsum(-1), k, top_p)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _top_k_bound(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[R]` tokens top-k keeps: `vocab` where it is off (0, -1) or past the vocabulary."""
    return torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)


def _dropped(probs: torch.Tensor, mass: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of a row's tokens, sorted by falling probability `probs` `[R, C]` (of the row's whole
    softmax; `mass` their cumulative sum), fall outside top-k or the top-p nucleus: a token goes once
    the mass before it reaches top_p; the best token always stays."""
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]
    return (ranks >= k[:, None]) | ((mass - probs >= top_p[:, None]) & (ranks > 0))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Next token `[R]` of each row of fp32 `logits` `[R, V]`; rows with temperature 0 take the argmax.

    Every per-row argument is a `[R]` tensor on the logits' device; nothing leaves the device but two
    flags (all rows greedy, some row filtering) and, when rows filter, whether the candidates hold
    every such row's tokens (and, when they do not, which rows draw from the whole vocabulary).
    """
    greedy = temperature <= 0
    filters = ((top_p < 1) | ((top_k > 0) & (top_k <= CANDIDATES))) & ~greedy
    all_greedy, any_filter = torch.stack([greedy.all(), filters.any()]).tolist()  # one wait for the device
    if all_greedy:
        return logits.argmax(-1)
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    if any_filter:
        drawn, covered = _sample_candidates(logits, safe_t, top_k, top_p, seeds, positions)
        if not bool((covered | greedy).all()):
            rows = (~(covered | greedy)).nonzero()[:, 0]
            full = sample_full(logits[rows], safe_t[rows], top_k[rows], top_p[rows], seeds[rows], positions[rows])
            drawn = drawn.index_put((rows,), full)
    else:
        drawn = sample_full(logits, safe_t, top_k, top_p, seeds, positions)
    return torch.where(greedy, logits.argmax(-1), drawn)


def sample_full(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, positions: torch.Tensor,
) -> torch.Tensor:
    """The race over the whole vocabulary (temperature > 0 in every row): the reference path."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    race = probs / -torch.log(uniform_noise(seeds, positions, logits.shape[-1]))
    return race.argmax(-1)


def _sample_candidates(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The race among each row's `CANDIDATES` most likely tokens, and `[R]` whether that is the row's
    true draw: false where the row may keep a token outside them (no filter, top-k above them, a
    nucleus reaching past them)."""
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    values, ids = torch.topk(scaled, min(CANDIDATES, vocab), dim=-1)
    probs = (values - torch.logsumexp(scaled, -1, keepdim=True)).exp()
    k = _top_k_bound(top_k, vocab)
    mass = probs.cumsum(-1)
    covered = (k <= ids.shape[-1]) | ((top_p < 1) & (mass[:, -1] >= top_p))
    kept = values.masked_fill(_dropped(probs, mass, k, top_p), float("-inf")).softmax(-1)
    race = kept / -torch.log(uniform_noise(seeds, positions, ids))
    return ids.gather(1, race.argmax(-1, keepdim=True))[:, 0], covered
