"""A decoder layer's two halves as one C++ op each, for the engine's packed passes on the CPU.

At batch 1 a small model's decode step on a few cores is bound by the Python around its ops (module
calls, checks, views), not by the ops. `mixer_half` and `mlp_residual` run the same kernels the
layer modules call, chained in C++ (`csrc/cpu_blocks.cpp`), where every linear runs hyla's packed
bf16 kernel. They return None wherever that does not hold, and the modules run instead: they are
the reference the tests hold these to. What a half passes its kernel besides the step's inputs (norm
and packed weights, shapes) is resolved once and kept on the module as a `Plan`, valid while every
parameter it came from keeps its storage, version and dtype: resolving it every call took about a
sixth of a batch-1 decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyla.runtime.context import ForwardContext, PagedKV
from hyla.runtime.layers.attention import SoftmaxAttention
from hyla.runtime.layers.cpu_linear import Packed, PackedLinear, contents_key
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


class Plan(NamedTuple):
    """A half's constant kernel arguments, around the step's own (`before` them, then `after`), and
    the parameters they come from, as `(module._parameters, name)`, with their `contents_key`s then."""

    params: tuple[tuple[dict, str], ...]
    keys: tuple
    before: tuple
    after: tuple = ()


def _keys(params: tuple[tuple[dict, str], ...]) -> tuple:
    return tuple(contents_key(table[name]) for table, name in params)


def _params(*modules: torch.nn.Module) -> tuple[tuple[dict, str], ...]:
    return tuple((m._parameters, name) for m in modules for name in m._parameters)


def _plan(owner: torch.nn.Module) -> Plan | None:
    """`owner`'s plan while its parameters are those it was made from (inference only)."""
    plan = owner.__dict__.get("_cpu_half_plan")
    if plan is None or torch.is_grad_enabled():
        return None
    return plan if _keys(plan.params) == plan.keys else None


def _keep(owner: torch.nn.Module, params: tuple[tuple[dict, str], ...], before: tuple, after: tuple = ()) -> Plan:
    plan = Plan(params, _keys(params), before, after)
    owner.__dict__["_cpu_half_plan"] = plan
    return plan


def mixer_half(mixer: torch.nn.Module, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
    """`mixer(norm(x), ctx)` as one op for softmax attention and Gated DeltaNet, or None where it
    does not apply."""
    if x.dtype is not torch.bfloat16 or not x.is_cpu:
        return None
    if type(mixer) is SoftmaxAttention:
        kv = ctx.paged_kv(mixer.layer_idx)
        if kv is None or kv.keys.dtype is not x.dtype:
            return None
        plan = _plan(mixer) or _attention_plan(mixer, norm, x, kv, ctx)
        if plan is None:
            return None
        cos, sin = ctx.rope
        return cpu_kernels.attention_half(x, *plan.before, cos, sin, kv, *plan.after)
    if type(mixer) is GatedDeltaNet:
        slots = ctx.pooled_slots(mixer.layer_idx)
        if slots is None or slots.conv is None or ctx.token_mask is not None:
            return None
        plan = _plan(mixer) or _gdn_plan(mixer, norm, x)
        if plan is None:
            return None
        return cpu_kernels.gdn_half(x, *plan.before, slots, ctx.cu_seqlens, *plan.after)
    return None


def _attention_plan(
    attn: SoftmaxAttention, norm: RMSNorm, x: torch.Tensor, kv: PagedKV, ctx: ForwardContext
) -> Plan | None:
    if attn.q_norm is not None or attn.head_dim % 16 or not cpu_kernels.usable(x, norm.weight, kv.keys, ctx.rope[0]):
        return None
    linears = attn.input_projections()
    qkv, o = _packed(x, linears), _packed(x, (attn.o_proj,))
    if qkv is None or o is None:
        return None
    return _keep(
        attn, _params(norm, *linears, attn.o_proj),
        (norm.weight, norm.eps, qkv[0].weight, qkv[1], attn.num_heads, attn.num_kv_heads, attn.head_dim),
        (attn.head_dim**-0.5, o[0].weight, o[1]),
    )


def _gdn_plan(gdn: GatedDeltaNet, norm: RMSNorm, x: torch.Tensor) -> Plan | None:
    if not cpu_kernels.usable(x, norm.weight, gdn.o_norm.weight):
        return None
    linears = gdn.input_projections()
    proj, o = _packed(x, linears), _packed(x, (gdn.o_proj,))
    if proj is None or o is None:
        return None
    return _keep(
        gdn, _params(norm, *linears, gdn.o_proj, gdn, gdn.o_norm),
        (norm.weight, norm.eps, proj[0].weight, proj[1], gdn.num_heads, gdn.head_dim, gdn.conv_weight),
        (gdn.A_log, gdn.dt_bias, gdn.o_norm.weight, gdn.o_norm.eps, gdn.head_dim**-0.5, o[0].weight, o[1]),
    )


def mlp_residual(mlp: GatedMLP, norm: RMSNorm, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """`(x + a) + mlp(norm(x + a))` as one op, or None where it does not apply."""
    if x.dtype is not torch.bfloat16 or not x.is_cpu or a.dtype is not x.dtype:
        return None
    plan = _plan(mlp) or _mlp_plan(mlp, norm, x)
    if plan is None:
        return None
    return cpu_kernels.mlp_residual(x, a, *plan.before)


def _mlp_plan(mlp: GatedMLP, norm: RMSNorm, x: torch.Tensor) -> Plan | None:
    if not mlp.silu or not cpu_kernels.usable(x, norm.weight):
        return None
    linears = mlp.input_projections()
    gate_up, down = _packed(x, linears), _packed(x, (mlp.down_proj,))
    if gate_up is None or down is None:
        return None
    return _keep(
        mlp, _params(norm, *linears, mlp.down_proj),
        (norm.weight, norm.eps, gate_up[0].weight, gate_up[1], mlp.gate_proj.out_features, down[0].weight, down[1]),
    )
