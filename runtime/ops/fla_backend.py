"""CUDA backend on fla-core's Triton kernels (fla is imported only when these functions run).

Written against fla-core 0.6.0: inputs ``[B, T, H, ...]`` (no ``head_first``), states
``[N, H, K, V]``; chunk_gla requires an fp32 initial state, so states are passed and returned in fp32.
fp32 GLA always takes the fused recurrent kernel: fla-core 0.6.0's chunked GLA output kernel
(``chunk_gla_fwd_o_gk``) faults with a misaligned address on fp32 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    output_final_state: bool,
    recurrent: bool,
) -> tuple[Tensor, Tensor | None]:
    """fla ``fused_recurrent_gated_delta_rule`` if ``recurrent`` else ``chunk_gated_delta_rule``."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = fused_recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule
    o, final = fn(
        q, k, v, g=g, beta=beta, scale=scale, **_common(q, initial_state, cu_seqlens, output_final_state)
    )
    return o, _fp32(final)


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    output_final_state: bool,
    recurrent: bool,
) -> tuple[Tensor, Tensor | None]:
    """fla ``fused_recurrent_gla`` if ``recurrent`` (or fp32) else ``chunk_gla``."""
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    common = _common(q, initial_state, cu_seqlens, output_final_state)
    if recurrent or q.dtype == torch.float32:
        o, final = fused_recurrent_gla(q, k, v, gk=gk, scale=scale, **common)
    else:
        o, final = chunk_gla(q, k, v, g=gk, scale=scale, **common)
    return o, _fp32(final)


def _common(
    q: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | None, output_final_state: bool
) -> dict:
    return {
        "initial_state": None if initial_state is None else initial_state.float().contiguous(),
        "output_final_state": output_final_state,
        "cu_seqlens": None if cu_seqlens is None else cu_seqlens.to(q.device, torch.long),
    }


def _fp32(state: Tensor | None) -> Tensor | None:
    return None if state is None else state.float()
