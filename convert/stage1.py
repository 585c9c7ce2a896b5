"""Stage 1, attention alignment: each linear mixer learns to reproduce its teacher attention's
output on the teacher's own residual stream.

One teacher forward (no LM head) captures every layer's attention input and output; all linear
mixers then train at once on those pairs (they are independent given the teacher's stream).
Loss: mean over layers of the L2 error normalised by the target's mean square. Only the
linear-attention parameters train.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from hyla.convert.data import BatchStream
from hyla.convert.loop import LoopSettings, StageResult, adamw, train_loop
from hyla.runtime.context import DenseContext
from hyla.runtime.model import HybridForCausalLM


class AttentionAlignment(nn.Module):
    """The student's linear mixers scored against captured teacher attention outputs."""

    def __init__(self, student: HybridForCausalLM) -> None:
        super().__init__()
        self.layers = student.config.linear_layers
        self.mixers = nn.ModuleList(student.model.layers[i].self_attn for i in self.layers)

    def forward(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        b, t, _ = inputs[0].shape
        ctx = DenseContext(torch.arange(t, device=inputs[0].device).expand(b, t))
        losses = []
        for mixer, x, y in zip(self.mixers, inputs, targets):
            err = (mixer(x, ctx).float() - y.float()).pow(2).mean()
            losses.append(err / y.float().pow(2).mean().clamp_min(1e-8))
        return torch.stack(losses).mean()


@torch.no_grad()
def capture_attention(teacher: PreTrainedModel, input_ids: torch.Tensor, layers: list[int]):
    """Inputs and outputs of the teacher's attention modules at `layers` for one batch."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(idx: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            inputs[idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outputs[idx] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [
        teacher.model.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers
    ]
    try:
        teacher.model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [inputs[i] for i in layers], [outputs[i] for i in layers]


def run_stage1(
    teacher: PreTrainedModel,
    student: HybridForCausalLM,
    stream: BatchStream,
    lr: float,
    run: LoopSettings,
) -> StageResult:
    """Train every linear mixer of `student` (in place) on `run.steps` batches of teacher activations."""
    align = AttentionAlignment(student)
    wrapped = run.dist.wrap(align)
    optimizer = adamw(align.parameters(), run.dist.device, lr)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return wrapped(*capture_attention(teacher, ids, align.layers))

    return train_loop("stage 1", align, optimizer, loss, stream, run, clip=None)
