"""Gated DeltaNet mixer: L2-normalised q/k, beta = sigmoid(W_b x), g = -exp(A_log)·softplus(W_a x + dt_bias)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import ForwardContext
from hyla.runtime.layers.fusion import fused
from hyla.runtime.layers.linear_mixer import LinearMixer
from hyla.runtime.ops import cpu_kernels, fla_modules, gated_delta_rule
from hyla.runtime.ops.gdn_step_cuda import fused_gdn_step_
from hyla.runtime.ops.state_decode import gdn_decode_


@fused(training=fla_modules.l2_normalize)
def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim (zero stays zero)."""
    return x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


@fused
def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-decay g = -exp(A_log)·softplus(a + dt_bias) and beta = sigmoid(b), in fp32."""
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(b.float())


class GatedDeltaNet(LinearMixer):
    """Linear attention with the gated delta rule."""

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h = self.num_heads
        self.a_proj = nn.Linear(config.hidden_size, h, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, h, bias=False)
        self.A_log = nn.Parameter(torch.zeros(h))
        self.dt_bias = nn.Parameter(torch.zeros(h))

    def reset_linear_parameters(self) -> None:
        """A_log = log U(0, 16); dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1]."""
        super().reset_linear_parameters()
        with torch.no_grad():
            a = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16).clamp_min(1e-4)
            self.A_log.copy_(a.log())
            dt = torch.exp(
                torch.empty_like(a).uniform_(0, 1) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
            ).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (*super().input_projections(), self.a_proj, self.b_proj)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv, gate, a, b = self.project_in(x)
        fused = self._fused(qkv, gate, a, b, ctx)
        if fused is not None:
            return self.o_proj(fused[None])
        slots = ctx.decode_slots(self.layer_idx)
        q, k, v, conv_state = self.mix_qkv(qkv, ctx, slots)
        q, k = l2_normalize(q), l2_normalize(k)
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
        if slots is not None:
            o = gdn_decode_(q[0], k[0], v[0], g[0], beta[0], slots.recurrent, slots.index, self.head_dim**-0.5)
            return self.project_out(o[None], gate)
        o, state = gated_delta_rule(
            q, k, v, g, beta, initial_state=self.recurrent_state(ctx), cu_seqlens=ctx.cu_seqlens,
            max_len=ctx.max_seq_len,
        )
        ctx.store_linear_state(self.layer_idx, conv_state, state)
        return self.project_out(o, gate)

    def _fused(
        self, qkv: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor | None:
        """The layer after its projections as one kernel, where one applies: CUDA decode steps (Triton)
        and every packed pass on CPU (C++), over pooled states with a short conv. Else None."""
        if ctx.token_mask is not None or self.conv_weight is None:
            return None
        args = (self.A_log, self.dt_bias, self.o_norm.weight, self.o_norm.eps, self.head_dim**-0.5)
        if qkv.is_cuda:
            slots = ctx.decode_slots(self.layer_idx)
            if slots is None:
                return None
            return fused_gdn_step_(qkv[0], gate[0], a[0], b[0], self.conv_weight, *slots, *args)
        slots = ctx.pooled_slots(self.layer_idx)
        if slots is None or not cpu_kernels.usable(qkv, gate, self.o_norm.weight):
            return None
        return cpu_kernels.gdn_forward_(qkv[0], gate[0], a[0], b[0], self.conv_weight, *slots, ctx.cu_seqlens, *args)
