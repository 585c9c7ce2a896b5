"""fla-core's fused Triton modules for training on CUDA: RMSNorm (with its residual add; our own
backward), the L2 norm of q/k, the rotary embedding, the gated output norm, the MLP's SiLU gate, the
causal short conv and the LM-head KL.

Written as plain PyTorch, each of these is a chain of elementwise kernels over fp32 copies of the
activations, forward and backward; in a distillation step of a 135M student they took more device
time than the matmuls. `applies(x)` says when the fused forms run: on a CUDA tensor, with autograd
recording (or inside `forward_only()`: a distillation teacher's forward), where fla's chunked kernels
can train (`fla_backend.trains`), so that a GPU which trains on the PyTorch reference does so
throughout. The plain functions stay the reference the GPU tests compare against;
`HYLA_FLA_MODULES=0` keeps them on. Inference never takes these (it has its own compiled and graphed
paths).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

_forward_only: ContextVar[bool] = ContextVar("hyla_fla_forward_only", default=False)


@contextlib.contextmanager
def forward_only() -> Iterator[None]:
    """Take the fused modules without autograd too (a training step's teacher forward)."""
    token = _forward_only.set(True)
    try:
        yield
    finally:
        _forward_only.reset(token)


def applies(x: Tensor) -> bool:
    """Whether `x`'s forward should take fla's fused modules (autograd on or `forward_only`, and
    `trains_on(x.device)`)."""
    return (torch.is_grad_enabled() or _forward_only.get()) and trains_on(x.device)


def trains_on(device: torch.device) -> bool:
    """Whether training on `device` takes the fused modules (CUDA, fla trains there, not turned off)."""
    if device.type != "cuda" or os.environ.get("HYLA_FLA_MODULES", "1") == "0":
        return False
    from . import fla_backend

    return fla_backend.trains("gdn", device)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm(x) · weight; with `residual`, (x + residual, RMSNorm(x + residual) · weight). fla's
    forward kernel, our backward (see `rms_norm_train`)."""
    from .rms_norm_train import RMSNormFunction

    if residual is None:
        return RMSNormFunction.apply(x, weight, None, eps)
    y, summed = RMSNormFunction.apply(x, weight, residual, eps)
    return summed, y


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(Σx² + eps) over the last dim."""
    from fla.modules.norm.l2norm import l2norm

    return l2norm(x, eps=eps)


def gated_rms_norm(o: Tensor, weight: Tensor, eps: float, gate: Tensor) -> Tensor:
    """RMSNorm(o) · weight · SiLU(gate), per head (`o` and `gate` `[..., D]`)."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(o, gate, weight, None, activation="swish", eps=eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SiLU(gate) · up, in one kernel forward and one backward (strided rows read in place)."""
    from fla.modules.activations import swiglu as fla_swiglu

    return fla_swiglu(gate, up)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`x` `[B, T, H, D]`, its token t of every row rotated by row t of `cos`, `sin` `[T, D/2]` (halves
    rotated together), in one kernel forward and one backward."""
    from fla.modules.rotary import rotary_embedding

    return rotary_embedding(x, cos, sin)


def short_conv(x: Tensor, weight: Tensor, activation: str | None) -> Tensor:
    """Causal depthwise conv of a dense batch `[B, T, C]` from zero state (`weight` `[C, W]`)."""
    from fla.modules.causal_conv1d import causal_conv1d

    y, _ = causal_conv1d(x, weight.to(x.dtype), activation=activation)
    return y


def linear_kl(s_hidden: Tensor, t_hidden: Tensor, s_head: Tensor, t_head: Tensor) -> Tensor:
    """Mean per-row KL(teacher ‖ student) of the logits `hidden @ head.T`, rows `[N, H]`; the logits'
    gradient is computed with the loss, chunk by chunk, so no logits are kept or recomputed. The
    head's gradient accumulates in fp32 through TF32 matmuls (in full fp32 they took longer than
    the rest of the KL)."""
    from fla.modules.fused_kl_div import fused_kl_div_loss

    matmul = torch.backends.cuda.matmul
    precision, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    try:
        return fused_kl_div_loss(s_hidden, t_hidden.detach(), s_head, t_head.detach())
    finally:
        matmul.fp32_precision = precision
