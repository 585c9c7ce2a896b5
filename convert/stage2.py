"""Stage 2, end-to-end distillation: forward KL(teacher ‖ student) over the full vocabulary.

All student parameters train, in two learning-rate groups: the linear-attention mixers (new
maths, high lr; paper ≈ 1e-4) and everything else (teacher weights, low lr; paper ≈ 7e-6). The KL
is computed in token chunks (see `kl.py`), so full `[tokens × vocab]` logits never exist.
Selection probes are short runs of this same stage.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from hyla.convert.data import BatchStream
from hyla.convert.kl import chunked_kl
from hyla.convert.loop import LoopSettings, StageResult, adamw, train_loop
from hyla.convert.students import final_hidden, teacher_forward
from hyla.runtime.model import HybridForCausalLM


class Distiller(nn.Module):
    """Student forward + chunked KL against given teacher hidden states (what DDP wraps)."""

    def __init__(self, student: HybridForCausalLM, teacher_head: torch.Tensor, chunk: int) -> None:
        super().__init__()
        self.student = student
        self.teacher_head = teacher_head
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden(self.student, input_ids)
        return chunked_kl(hidden, teacher_hidden, self.student.lm_head.weight, self.teacher_head, self.chunk)


def param_groups(student: HybridForCausalLM, lr_mixer: float, lr_rest: float) -> list[dict]:
    """Linear-attention mixer parameters vs the rest (deduplicated: tied embeddings count once)."""
    mixer_ids = {id(p) for i in student.config.linear_layers for p in student.model.layers[i].self_attn.parameters()}
    mixer = [p for p in student.parameters() if id(p) in mixer_ids]
    rest = [p for p in student.parameters() if id(p) not in mixer_ids]
    return [g for g in ({"params": mixer, "lr": lr_mixer}, {"params": rest, "lr": lr_rest}) if g["params"]]


def run_stage2(
    name: str,
    teacher: PreTrainedModel,
    student: HybridForCausalLM,
    stream: BatchStream,
    lr_mixer: float,
    lr_rest: float,
    chunk: int,
    run: LoopSettings,
) -> StageResult:
    """Distil `student` (in place) from `teacher` for `run.steps` batches."""
    distiller = Distiller(student, teacher.lm_head.weight.detach(), chunk)
    wrapped = run.dist.wrap(distiller)
    optimizer = adamw(param_groups(student, lr_mixer, lr_rest), run.dist.device)
    teacher_hidden = teacher_forward(teacher, run.dist.device)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return wrapped(ids, teacher_hidden(ids))

    return train_loop(name, student, optimizer, loss, stream, run)
