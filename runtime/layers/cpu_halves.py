"""A decoder layer's two halves as one C++ op each, for the engine's packed passes on the CPU.

At batch 1 a small model's decode step on a few cores is bound by the Python around its ops (module
calls, checks, views), not by the ops. `attention_half` and `mlp_residual` run the same kernels the
layer modules call, chained in C++ (`csrc/cpu_blocks.cpp`), where every linear runs hyla's packed
bf16 kernel. They return None wherever that does not hold, and the modules run instead: they are
the reference the tests hold these to.
"""

from __future__ import annotations

import torch

from hyla.runtime.context import ForwardContext
from hyla.runtime.layers.attention import SoftmaxAttention
from hyla.runtime.layers.cpu_linear import Packed, PackedLinear
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


def attention_half(attn: torch.nn.Module, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """`attn(norm(x), ctx)` as one op, or None where it does not apply."""
    if type(attn) is not SoftmaxAttention or attn.q_norm is not None or x.dtype != torch.bfloat16:
        return None
    kv = ctx.paged_kv(attn.layer_idx)
    cos, sin = ctx.rope
    if kv is None or not cpu_kernels.usable(x, norm.weight, kv.keys, cos) or attn.head_dim % 16:
        return None
    qkv, o = _packed(x, attn.input_projections()), _packed(x, (attn.o_proj,))
    if qkv is None or o is None:
        return None
    return cpu_kernels.attention_half(
        x, norm.weight, norm.eps, qkv[0].weight, qkv[1], attn.num_heads, attn.num_kv_heads, attn.head_dim, cos, sin,
        kv, attn.head_dim**-0.5, o[0].weight, o[1],
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
