"""What Gated DeltaNet and GLA layers share: teacher-shaped q/k/v/o projections, an optional
causal short conv on q/k/v, and a gated per-head RMSNorm on the output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import ForwardContext, LinearSlots
from hyla.runtime.layers.projections import project_groups
from hyla.runtime.layers.fusion import fused
from hyla.runtime.layers.norm import RMSNorm, rms_norm
from hyla.runtime.ops import fla_modules, short_conv
from hyla.runtime.ops.state_decode import short_conv_decode_


class LinearMixer(nn.Module):
    """Base of the linear-attention mixers. K/V are expanded to all query heads.

    State per sequence: a conv state `[3·H·D, W-1]` (when the short conv is on) and a recurrent
    state `[H, D, D]` (fp32).
    """

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = h = config.num_attention_heads
        self.head_dim = d = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, h * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, h * d, bias=config.qkv_bias)
        self.conv_size = config.linear_conv_size
        self.conv_weight = nn.Parameter(torch.zeros(3 * h * d, self.conv_size)) if self.conv_size > 0 else None
        self.g_proj = nn.Linear(hidden, h * d, bias=False)
        self.o_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = nn.Linear(h * d, hidden, bias=config.o_bias)

    def reset_linear_parameters(self) -> None:
        """Initialise what the teacher does not provide. The conv starts as the identity."""
        if self.conv_weight is not None:
            with torch.no_grad():
                self.conv_weight.zero_()
                self.conv_weight[:, -1] = 1.0

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The linears that read the layer's input: q, k, v, the output gate, then the mixer's own."""
        return (self.q_proj, self.k_proj, self.v_proj, self.g_proj)

    def project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`input_projections()` of `x`: q/k/v concatenated, the output gate, then the mixer's own."""
        q, k, v, g, *own = self.input_projections()
        return project_groups(x, (q, k, v), (g,), *((m,) for m in own))

    def mix_qkv(
        self, qkv: torch.Tensor, ctx: ForwardContext, slots: LinearSlots | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k, v `[B, T, H, D]` from the stacked projection after conv + SiLU, and the new conv state
        (None when `slots` took it in place)."""
        b, t, _ = qkv.shape
        if ctx.token_mask is not None:
            qkv = torch.where(ctx.token_mask[..., None], qkv, torch.zeros((), dtype=qkv.dtype, device=qkv.device))
        conv_state = None
        if self.conv_weight is not None and slots is not None:
            qkv = short_conv_decode_(qkv[0], self.conv_weight.to(qkv.dtype), slots.conv, slots.index)[None]
        elif self.conv_weight is not None:
            qkv, conv_state = short_conv(
                qkv,
                self.conv_weight.to(qkv.dtype),
                conv_state=ctx.linear_state(self.layer_idx)[0],
                cu_seqlens=ctx.cu_seqlens,
                activation="silu",
            )
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        return q, k, v, conv_state

    def project_out(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o_proj(RMSNorm(o) * SiLU(gate)), `gate` being the g_proj output."""
        b, t, _ = gate.shape
        gate = gate.view(b, t, self.num_heads, self.head_dim)
        return self.o_proj(gated_rms_norm(o.to(gate.dtype), self.o_norm.weight, self.o_norm.eps, gate).reshape(b, t, -1))

    def recurrent_state(self, ctx: ForwardContext) -> torch.Tensor | None:
        return ctx.linear_state(self.layer_idx)[1]


@fused(training=fla_modules.gated_rms_norm)
def gated_rms_norm(o: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    """RMSNorm(o) * SiLU(gate)."""
    return rms_norm.plain(o, weight, eps) * F.silu(gate)
