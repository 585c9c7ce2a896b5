"""Choosing the next token: greedy, temperature, top-k, top-p with per-sequence generators; logprobs."""

from __future__ import annotations

import torch

from hyla.runtime.outputs import TokenLogprobs
from hyla.runtime.sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row `[V]` scaled by temperature with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token of each row of `logits` `[R, V]` (fp32); greedy rows take the argmax."""
    tokens = logits.argmax(-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filter_logits(logits[row], p.temperature, p.top_k, p.top_p).softmax(-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens


def token_logprobs(logprobs: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """{token: (logprob, rank)} for `token_id` and the `top_n` most likely tokens of one row `[V]`."""
    chosen = logprobs[token_id]
    out: TokenLogprobs = {token_id: (float(chosen), int((logprobs > chosen).sum()) + 1)}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        for rank, (lp, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(tid, (lp, rank))
    return out
