"""A decoder layer's two halves as one C++ op each, for the engine's packed passes on the CPU.

At batch 1 a small model's decode step on a few cores is bound by the Python around its ops (module
calls, checks, views), not by the ops. `mixer_half` and `mlp_residual` run the same kernels the
layer modules call, chained in C++ (`csrc/cpu_blocks.cpp`), where every linear runs hyla's packed
bf16 kernel. They return None wherever that does not hold, and the modules run instead: they are
the reference the tests hold these to.
"""

from __future__ import annotations

import torch

from hyla.runtime.context import ForwardContext
from hyla.runtime.layers.attention import SoftmaxAttention
from hyla.runtime.layers.cpu_linear import Packed, PackedLinear
from hyla.runtime.layers.gated_deltanet import GatedDeltaNet
from hyla.runtime.layers.mlp import GatedMLP
from hyla.runtime.layers.norm import RMSNorm
from hyla.runtime.ops import cpu_kernels


def _packed(x: torch.Tensor, linears: tuple[torch.nn.Module, ...]) -> tuple[Packed, torch.Tensor | None] | None:
    """The stacked packed weight (and bias) of `linears` for hyla's kernel, or None."""
    first = linears[0]
    if type(first) is not PackedLinear or not first.packs(x):
        return None
    if len(linears) == 1:
        packed, bias = first.packed_weight(), first.bias
    else:
        if not all(type(m) is PackedLinear for m in linears):
            return None
        packed, bias = first.stacked_weight(linears)
    return (packed, bias) if packed.hyla else None


def mixer_half(mixer: torch.nn.Module, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """`mixer(norm(x), ctx)` as one op for softmax attention and Gated DeltaNet, or None where it
    does not apply."""
    if x.dtype != torch.bfloat16 or not cpu_kernels.usable(x, norm.weight):
        return None
    if type(mixer) is SoftmaxAttention:
        return _attention(mixer, norm, x, ctx)
    if type(mixer) is GatedDeltaNet:
        return _gdn(mixer, norm, x, ctx)
    return None


def _attention(attn: SoftmaxAttention, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    if attn.q_norm is not None or attn.head_dim % 16:
        return None
    kv = ctx.paged_kv(attn.layer_idx)
    if kv is None or not cpu_kernels.usable(x, kv.keys, ctx.rope[0]):
        return None
    qkv, o = _packed(x, attn.input_projections()), _packed(x, (attn.o_proj,))
    if qkv is None or o is None:
        return None
    cos, sin = ctx.rope
    return cpu_kernels.attention_half(
        x, norm.weight, norm.eps, qkv[0].weight, qkv[1], attn.num_heads, attn.num_kv_heads, attn.head_dim, cos, sin,
        kv, attn.head_dim**-0.5, o[0].weight, o[1],
    )


def _gdn(gdn: GatedDeltaNet, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    slots = ctx.pooled_slots(gdn.layer_idx)
    if slots is None or slots.conv is None or ctx.token_mask is not None or gdn.o_norm.weight.dtype != x.dtype:
        return None
    proj, o = _packed(x, gdn.input_projections()), _packed(x, (gdn.o_proj,))
    if proj is None or o is None:
        return None
    return cpu_kernels.gdn_half(
        x, norm.weight, norm.eps, proj[0].weight, proj[1], gdn.num_heads, gdn.head_dim, gdn.conv_weight, slots,
        ctx.cu_seqlens, gdn.A_log, gdn.dt_bias, gdn.o_norm.weight, gdn.o_norm.eps, gdn.head_dim**-0.5, o[0].weight,
        o[1],
    )


def mlp_residual(mlp: GatedMLP, norm: RMSNorm, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """`(x + a) + mlp(norm(x + a))` as one op, or None where it does not apply."""
    if not mlp.silu or x.dtype != torch.bfloat16 or not cpu_kernels.usable(x, a, norm.weight):
        return None
    gate_up, down = _packed(x, mlp.input_projections()), _packed(x, (mlp.down_proj,))
    if gate_up is None or down is None:
        return None
    return cpu_kernels.mlp_residual(
        x, a, norm.weight, norm.eps, gate_up[0].weight, gate_up[1], mlp.gate_proj.out_features, down[0].weight, down[1]
    )
