"""Held-out scoring: per-token KL(teacher ‖ model) and perplexity on held-out blocks.

The teacher's final hidden states on the held-out blocks are computed once (`TeacherReference`);
every later score (probes, report) reuses them, so scoring a student costs one student forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from hyla.convert.kl import chunked_nll_kl
from hyla.convert.students import autocast, final_hidden


@dataclass
class TeacherReference:
    """Held-out blocks `[N, T]`, the teacher's hidden states on them and its LM head."""

    blocks: torch.Tensor
    hidden: torch.Tensor
    head: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: PreTrainedModel, blocks: torch.Tensor, batch_size: int) -> "TeacherReference":
        device = teacher.lm_head.weight.device
        parts = []
        for start in range(0, blocks.shape[0], batch_size):
            with autocast(device):
                parts.append(final_hidden(teacher, blocks[start : start + batch_size].to(device)))
        return cls(blocks, torch.cat(parts), teacher.lm_head.weight.detach())

    def prefix(self, tokens: int) -> "TeacherReference":
        """The first blocks holding at least `tokens` tokens."""
        n = max(1, math.ceil(tokens / self.blocks.shape[1]))
        return TeacherReference(self.blocks[:n], self.hidden[:n], self.head)


@torch.no_grad()
def score(
    model: PreTrainedModel,
    ref: TeacherReference,
    batch_size: int,
    chunk: int,
    with_kl: bool = True,
    forward: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> dict[str, float]:
    """`{"kl": mean per-token KL vs the teacher, "ppl": perplexity, "tokens": n}` on the reference blocks.

    `forward(ids, first_block)` replaces the model's own forward (final hidden states) when given.
    """
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    nll = kl = 0.0
    count = 0
    for start in range(0, ref.blocks.shape[0], batch_size):
        ids = ref.blocks[start : start + batch_size].to(device)
        with autocast(device):
            hidden = final_hidden(model, ids) if forward is None else forward(ids, start)
            t_hidden = ref.hidden[start : start + batch_size] if with_kl else None
            n, k, c = chunked_nll_kl(hidden, t_hidden, model.lm_head.weight, ref.head if with_kl else None, ids, chunk)
        nll, kl, count = nll + n, kl + k, count + c
    model.train(was_training)
    return {"kl": kl / count, "ppl": math.exp(nll / count), "tokens": count}
