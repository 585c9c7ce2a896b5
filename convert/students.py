"""Students of a conversion: which layers are linear, stage-1 mixers, and the forward helpers both
models share (final hidden states under bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.context import DenseContext
from hyla.runtime.model import HybridForCausalLM


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
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).expand(b, t)
        return model.model(input_ids, DenseContext(pos))
    return model.model(input_ids=input_ids).last_hidden_state


def _dense_context(model: HybridForCausalLM, input_ids: torch.Tensor, dtype: torch.dtype) -> DenseContext:
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    ctx = DenseContext(pos)
    ctx.rope = model.model.rotary_emb.cos_sin(pos, dtype)
    return ctx


def layer_inputs(model: HybridForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer of a hybrid `[B, T, H]` (L tensors)."""
    x = model.model.embed_tokens(input_ids)
    ctx = _dense_context(model, input_ids, x.dtype)
    inputs = []
    for layer in model.model.layers:
        inputs.append(x)
        x = layer(x, ctx)
    return inputs


def hidden_from(model: HybridForCausalLM, x: torch.Tensor, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Final hidden states, running only layers `start…` on the residual stream `x` entering `start`."""
    ctx = _dense_context(model, input_ids, x.dtype)
    for layer in model.model.layers[start:]:
        x = layer(x, ctx)
    return model.model.norm(x)


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
