"""CUDA backend on fla-core's Triton kernels (fla is imported only when these functions run).

Written against fla-core 0.6.0: inputs ``[B, T, H, ...]`` (no ``head_first``), states
``[N, H, K, V]``; chunk_gla requires an fp32 initial state, so states are passed and returned in fp32.
fp32 GLA always takes the fused recurrent kernel: fla-core 0.6.0's chunked GLA output kernel
(``chunk_gla_fwd_o_gk``) faults with a misaligned address on fp32 inputs.
Some fla / Triton / GPU combinations refuse to backpropagate (fla-core 0.6.0 with Triton < 3.7.1 on
Hopper raises for its gated backward); :func:`trains` finds out once per op and device.
"""

from __future__ import annotations

import functools
import os
import warnings
from importlib import metadata

import torch
import torch.nn.functional as F
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


def training_allowed() -> bool:
    """Whether training may use fla at all (`HYLA_FLA_TRAINING`, on unless "0")."""
    return os.environ.get("HYLA_FLA_TRAINING", "1") != "0"


def training_kernels(op: str, device: torch.device) -> str:
    """What backpropagates through `op` on `device`: fla's kernels or the PyTorch reference, with
    the versions that decided it on CUDA."""
    if device.type != "cuda":
        return "pytorch"
    if not training_allowed():
        return "pytorch (HYLA_FLA_TRAINING=0)"
    import triton

    versions = f"fla-core {metadata.version('fla-core')}, triton {triton.__version__}"
    return f"fla ({versions})" if trains(op, device) else f"pytorch (fla refused: {versions})"


@functools.cache
def trains(op: str, device: torch.device) -> bool:
    """Whether fla's chunked kernels of `op` ("gdn" or "gla") can backpropagate on `device`.

    Runs one tiny bf16 forward and backward; a refusal is reported once as a warning. Never with
    `HYLA_FLA_TRAINING=0` (training then takes the PyTorch reference, inference keeps fla).
    """
    if not training_allowed():
        return False
    gen = torch.Generator(device).manual_seed(0)
    shape = (1, 64, 1, 64)
    q, k, v = (torch.randn(shape, device=device, generator=gen) for _ in range(3))
    gate = F.logsigmoid(torch.randn(shape if op == "gla" else shape[:3], device=device, generator=gen))
    inputs = [F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, gate]
    if op == "gdn":
        inputs.append(torch.rand(shape[:3], device=device, generator=gen))
    inputs = [x.bfloat16().requires_grad_() for x in inputs]
    run = gated_delta_rule if op == "gdn" else gated_linear_attention
    try:
        with torch.enable_grad():
            o, _ = run(*inputs, scale=1.0, initial_state=None, cu_seqlens=None, output_final_state=False,
                       recurrent=False)
            o.float().sum().backward()
    except RuntimeError as exc:
        warnings.warn(f"fla cannot train {op} on {device} ({exc}); training uses the PyTorch reference there",
                      stacklevel=2)
        return False
    return True
