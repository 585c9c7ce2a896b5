"""Choosing the next token for a whole batch on the logits' device: greedy, temperature, top-k, top-p.

Random draws are counter-based: the noise of row r depends only on that sequence's seed and the
position it samples for, so a seeded sequence draws the same tokens whatever else is in the batch,
after preemption, on any device. The draw is the exponential race (argmax of p / E, E ~ Exp(1)),
which picks token v with probability p_v.
"""

from __future__ import annotations

import torch

from hyla.runtime.outputs import TokenLogprobs

_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix of int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[R, vocab]` uniforms in (0, 1), a pure function of each row's (seed, position) and the column."""
    seeds, positions = seeds.long(), positions.long()
    row = _fmix32((seeds & _MASK32) ^ _fmix32(((seeds >> 32) & _MASK32) ^ _fmix32(positions & _MASK32)))
    cols = (torch.arange(vocab, device=seeds.device, dtype=torch.long) * 0x9E3779B1) & _MASK32
    h = _fmix32(_fmix32(row[:, None] ^ cols) ^ row[:, None])
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Rows `[R, V]` scaled by their temperature, everything outside top-k / the top-p nucleus at -inf.

    `temperature` `[R]` (> 0), `top_k` `[R]` (0 or -1: off), `top_p` `[R]` (1: off).
    """
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if bool((k < vocab).any()) or bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None]
        probs = sorted_logits.softmax(-1)
        # mass before a token already reaching top_p drops it; the best token always stays
        drop = (ranks >= k[:, None]) | ((probs.cumsum(-1) - probs >= top_p[:, None]) & (ranks > 0))
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Next token `[R]` of each row of fp32 `logits` `[R, V]`; rows with temperature 0 take the argmax.

    Every per-row argument is a `[R]` tensor on the logits' device; nothing leaves the device.
    """
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = filter_logits(logits, safe_t, top_k, top_p).softmax(-1)
    race = probs / -torch.log(uniform_noise(seeds, positions, logits.shape[-1]))
    return torch.where(greedy, logits.argmax(-1), race.argmax(-1))


def token_logprobs(logprobs: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """{token: (logprob, rank among the vocabulary (1 = best))} for `token_id` and the `top_n` best tokens."""
    chosen = logprobs[token_id]
    out: TokenLogprobs = {token_id: (float(chosen), int((logprobs > chosen).sum()) + 1)}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        for rank, (lp, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(tid, (lp, rank))
    return out
