"""Stage 3 (optional): a short next-token cross-entropy finetune of the whole student, optionally
at a longer context than distillation used (blocks are re-packed from the same token stream)."""

from __future__ import annotations

import torch
from torch import nn

from hyla.convert.data import BatchStream
from hyla.convert.loop import LoopSettings, StageResult, adamw, train_loop
from hyla.runtime.model import HybridForCausalLM


def repack(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`[N, T]` consecutive blocks as `[N·T // seq_len, seq_len]`."""
    flat = blocks.reshape(-1)
    n = flat.numel() // seq_len
    if n == 0:
        raise ValueError(f"not enough training tokens for one block of {seq_len}")
    return flat[: n * seq_len].view(n, seq_len)


class CausalLoss(nn.Module):
    def __init__(self, student: HybridForCausalLM) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.student(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def run_finetune(
    student: HybridForCausalLM,
    stream: BatchStream,
    lr: float,
    run: LoopSettings,
) -> StageResult:
    """Cross-entropy finetune of all parameters of `student` (in place)."""
    wrapped = run.dist.wrap(CausalLoss(student))
    optimizer = adamw(student.parameters(), run.dist.device, lr)
    return train_loop("stage 3", student, optimizer, wrapped, stream, run)
