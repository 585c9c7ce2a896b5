"""Full-vocabulary KL(teacher ‖ student) and cross-entropy, computed over chunks of tokens.

Only `chunk` rows of either model's logits exist at a time; under autograd each chunk is
checkpointed, so its logits are recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hyla.runtime.ops import fla_modules


def _kl_sum(s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: torch.Tensor, t_head: torch.Tensor) -> torch.Tensor:
    t_logp = F.log_softmax(F.linear(t_hidden, t_head).float(), -1)
    s_logp = F.log_softmax(F.linear(s_hidden, s_head).float(), -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def chunked_kl(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: torch.Tensor, t_head: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) from final hidden states `[..., H]` and LM-head weights.
    In CUDA training with fla, its fused form (chunks of its own size, no recompute) runs instead."""
    s_hidden, t_hidden = s_hidden.reshape(-1, s_hidden.shape[-1]), t_hidden.reshape(-1, t_hidden.shape[-1])
    if fla_modules.applies(s_hidden):
        return fla_modules.linear_kl(s_hidden, t_hidden, s_head, t_head)
    total = s_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, s_hidden.shape[0], chunk):
        args = (s_hidden[start : start + chunk], t_hidden[start : start + chunk], s_head, t_head)
        if torch.is_grad_enabled():
            total = total + checkpoint(_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _kl_sum(*args)
    return total / s_hidden.shape[0]


@torch.no_grad()
def chunked_nll_kl(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor | None,
    s_head: torch.Tensor,
    t_head: torch.Tensor | None,
    input_ids: torch.Tensor,
    chunk: int,
) -> tuple[float, float, int]:
    """(sum of next-token NLL, sum of KL, tokens scored) over `[B, T]` blocks; KL is 0 without a teacher."""
    s = s_hidden[:, :-1].reshape(-1, s_hidden.shape[-1])
    t = None if t_hidden is None else t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    nll = kl = 0.0
    for start in range(0, s.shape[0], chunk):
        rows = slice(start, start + chunk)
        s_logp = F.log_softmax(F.linear(s[rows], s_head).float(), -1)
        nll += float(-s_logp.gather(-1, labels[rows, None]).sum())
        if t is not None:
            t_logp = F.log_softmax(F.linear(t[rows], t_head).float(), -1)
            kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
    return nll, kl, s.shape[0]
