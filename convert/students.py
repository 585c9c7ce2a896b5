"""Students of a conversion: which layers are linear, stage-1 mixers, and the forward helpers both
models share (final hidden states under bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.context import DenseContext
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.ops import fla_modules


def layer_types(num_layers: int, softmax: list[int] | set[int], linear: str) -> list[str]:
    """`attention` at the softmax indices, `linear` everywhere else."""
    return ["attention" if i in set(softmax) else linear for i in range(num_layers)]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the fla kernels run in bf16); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states `[B, T, H]` of a hybrid or an HF teacher (no LM head)."""
    if isinstance(model, HybridForCausalLM):
        return model.model(input_ids, _dense_context(input_ids))
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def teacher_forward(teacher: PreTrainedModel, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`ids -> final hidden states` of `teacher` without autograd. Where fla's fused modules train
    (CUDA), the teacher runs as an all-softmax hybrid of its own weights on them (its RMSNorms with
    their residual adds and its SwiGLUs one kernel each), else as itself."""
    if not fla_modules.trains_on(device) or isinstance(teacher, HybridForCausalLM):
        model, context = teacher, contextlib.nullcontext
    else:
        types = ["attention"] * teacher.config.num_hidden_layers
        model = hybrid_from_teacher(teacher, types).to(device).eval().requires_grad_(False)
        context = fla_modules.forward_only

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), context():
            return final_hidden(model, input_ids)

    return forward


def _dense_context(input_ids: torch.Tensor) -> DenseContext:
    """Positions 0…T-1, one row shared by the batch (so RoPE's tables are computed once)."""
    return DenseContext(torch.arange(input_ids.shape[1], device=input_ids.device)[None])


def layer_inputs(model: HybridForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer of a hybrid `[B, T, H]` (L tensors)."""
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for layer in model.model.layers]
    try:
        final_hidden(model, input_ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def hidden_from(model: HybridForCausalLM, x: torch.Tensor, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Final hidden states, running only layers `start…` on the residual stream `x` entering `start`."""
    return model.model(None, _dense_context(input_ids), inputs_embeds=x, first_layer=start)


def save_mixers(student: HybridForCausalLM, path: Path) -> None:
    """Save the linear-attention mixers (`layers.{i}.…`) of a student."""
    state = {
        f"layers.{i}.{name}": p.detach().float().cpu().contiguous()
        for i in student.config.linear_layers
        for name, p in student.model.layers[i].self_attn.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp)
    tmp.rename(path)


@torch.no_grad()
def load_mixers(student: HybridForCausalLM, path: Path) -> None:
    """Load saved mixers into every linear layer of `student` (softmax layers keep the teacher's)."""
    state = load_file(path)
    for i in student.config.linear_layers:
        prefix = f"layers.{i}."
        mixer = student.model.layers[i].self_attn
        mixer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def make_student(
    teacher: PreTrainedModel, softmax: list[int] | set[int], linear: str, seed: int, mixers: Path | None = None
) -> HybridForCausalLM:
    """Weight transfer from the teacher (fp32 master weights), then the stage-1 mixers if given."""
    student = hybrid_from_teacher(teacher, layer_types(teacher.config.num_hidden_layers, softmax, linear), seed)
    student = student.float()
    if mixers is not None:
        load_mixers(student, mixers)
    return student
