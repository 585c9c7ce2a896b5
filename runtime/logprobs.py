"""Log-probabilities of chosen tokens, scored on the logits' device for a whole step at once: each
row's target token (the next prompt token, or the token drawn), its rank and the row's best tokens.
Only these few numbers travel to the host, never a `[rows, vocabulary]` tensor."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyla.runtime.ops import cpu_kernels
from hyla.runtime.outputs import TokenLogprobs

CPU_ROWS = 32
"""Rows scored per pass on the CPU."""


class Scores(NamedTuple):
    """`[S]` targets, their log-probabilities and ranks (1 = best); `[S, n]` each row's best `n`."""

    targets: torch.Tensor
    chosen: torch.Tensor
    ranks: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor

    def entries(self, top_n: list[int]) -> list[TokenLogprobs]:
        """Host entries, row i keeping its own `top_n[i]` best tokens."""
        chosen, ranks, targets = self.chosen.tolist(), self.ranks.tolist(), self.targets.tolist()
        values, ids = self.top_values.tolist(), self.top_ids.tolist()
        return [token_logprobs(t, c, r, v[:n], i[:n])
                for t, c, r, v, i, n in zip(targets, chosen, ranks, values, ids, top_n, strict=True)]


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> Scores:
    """Score `targets[i]` under `log_softmax(logits[i])` (fp32), with the `top_n` best of every row.

    On the CPU, without best tokens to report (lm-eval's log-likelihoods), one C++ op scores every
    row; otherwise the rows go `CPU_ROWS` at a time: a whole step's `[rows, vocabulary]`
    temporaries outgrow the caches (1,000 rows of a 49k vocabulary score 4x faster in passes of 32)."""
    if top_n == 0 and cpu_kernels.usable(logits):  # one C++ op: no log-softmax written
        chosen, ranks = cpu_kernels.score_rows(logits.contiguous(), targets)
        none = chosen.new_empty(chosen.shape[0], 0)
        return Scores(targets, chosen, ranks, none, none.long())
    step = CPU_ROWS if logits.device.type == "cpu" else max(1, logits.shape[0])
    parts = [_score(logits[i : i + step], targets[i : i + step], top_n) for i in range(0, logits.shape[0], step)]
    return Scores(*(torch.cat(column) for column in zip(*parts))) if len(parts) != 1 else parts[0]


def _score(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> Scores:
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
    return Scores(targets, chosen[:, 0], ranks, values, ids)


def token_logprobs(token: int, logprob: float, rank: int, top_values: list[float], top_ids: list[int]) -> TokenLogprobs:
    """{token: (logprob, rank)} for the scored token and, after it, each of the best tokens."""
    out: TokenLogprobs = {token: (logprob, rank)}
    for rank_, (value, tid) in enumerate(zip(top_values, top_ids), start=1):
        out.setdefault(tid, (value, rank_))
    return out
