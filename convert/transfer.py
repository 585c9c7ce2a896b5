"""Weight transfer: build a hybrid from a teacher, copying every weight the two share.

Softmax layers, MLPs, norms, embeddings and the LM head are copied as they are. Linear-attention
layers take the teacher's q/k/v/o projections, with grouped K/V heads expanded head-wise: KV head j
is copied to each query head of its group (j·G … j·G + G − 1), matching how GQA pairs them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from hyla.runtime.config import HybridConfig
from hyla.runtime.layers.linear_mixer import LinearMixer
from hyla.runtime.model import HybridForCausalLM


def expand_heads(t: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """`[Hkv·D, ...]` -> `[Hkv·G·D, ...]`, each KV head's rows repeated for its G query heads."""
    rows = t.reshape(kv_heads, -1, *t.shape[1:])
    return rows.repeat_interleave(groups, dim=0).reshape(-1, *t.shape[1:])


def _copy_linear(dst: nn.Linear, src: nn.Linear, kv_heads: int = 0, groups: int = 1) -> None:
    w, b = src.weight.data, None if src.bias is None else src.bias.data
    if kv_heads:
        w = expand_heads(w, kv_heads, groups)
        b = None if b is None else expand_heads(b, kv_heads, groups)
    dst.weight.data.copy_(w)
    if dst.bias is not None and b is not None:
        dst.bias.data.copy_(b)


def transfer_attention(mixer: LinearMixer, teacher_attn: nn.Module, config: HybridConfig) -> None:
    """Initialise a linear mixer's q/k/v/o from the teacher's attention of the same layer."""
    kv, groups = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    _copy_linear(mixer.q_proj, teacher_attn.q_proj)
    _copy_linear(mixer.k_proj, teacher_attn.k_proj, kv, groups)
    _copy_linear(mixer.v_proj, teacher_attn.v_proj, kv, groups)
    _copy_linear(mixer.o_proj, teacher_attn.o_proj)


@torch.no_grad()
def hybrid_from_teacher(
    teacher: PreTrainedModel, layer_types: list[str], seed: int = 0, **config_overrides: object
) -> HybridForCausalLM:
    """A hybrid with the teacher's weights and fresh linear-attention parameters (seeded)."""
    config = HybridConfig.from_teacher(teacher.config, layer_types=layer_types, **config_overrides)
    torch.manual_seed(seed)
    student = HybridForCausalLM(config).to(dtype=teacher.dtype)
    shared = {k: v for k, v in teacher.state_dict().items() if k in student.state_dict()}
    for i in config.linear_layers:  # linear mixers take the teacher's attention through `transfer_attention`
        shared = {k: v for k, v in shared.items() if not k.startswith(f"model.layers.{i}.self_attn.")}
        transfer_attention(student.model.layers[i].self_attn, teacher.model.layers[i].self_attn, config)
    missing = set(student.state_dict()) - set(shared)
    unexpected = [k for k in missing if not _is_linear_only(k, config)]
    if unexpected:
        raise ValueError(f"teacher lacks weights the hybrid needs: {sorted(unexpected)[:5]}")
    student.load_state_dict(shared, strict=False)
    return student.to(teacher.device).eval()


def _is_linear_only(key: str, config: HybridConfig) -> bool:
    """Keys that only linear-attention layers (or the tied LM head) have."""
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return True
    return any(key.startswith(f"model.layers.{i}.self_attn.") for i in config.linear_layers)
