"""Gated Linear Attention mixer with a data-dependent low-rank forget gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import ForwardContext
from hyla.runtime.layers.linear_mixer import LinearMixer
from hyla.runtime.ops import gated_linear_attention
from hyla.runtime.ops.state_decode import gla_decode_

GATE_LOGIT_NORMALIZER = 16.0


class GatedLinearAttention(LinearMixer):
    """gk = logsigmoid(W_up W_down x + b) / 16 per key dim; output through the shared gated norm."""

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.gk_down = nn.Linear(config.hidden_size, config.gla_gate_rank, bias=False)
        self.gk_up = nn.Linear(config.gla_gate_rank, self.num_heads * self.head_dim, bias=True)

    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (*super().input_projections(), self.gk_down)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        slots = ctx.decode_slots(self.layer_idx)
        qkv, gate, gk_low = self.project_in(x)
        q, k, v, conv_state = self.mix_qkv(qkv, ctx, slots)
        gk = F.logsigmoid(self.gk_up(gk_low).float()) / GATE_LOGIT_NORMALIZER
        gk = gk.view(b, t, self.num_heads, self.head_dim)
        if slots is not None:
            o = gla_decode_(q[0], k[0], v[0], gk[0], slots.recurrent, slots.index, self.head_dim**-0.5)
            return self.project_out(o[None], gate)
        o, state = gated_linear_attention(
            q, k, v, gk, initial_state=self.recurrent_state(ctx), cu_seqlens=ctx.cu_seqlens,
            max_len=ctx.max_seq_len,
        )
        ctx.store_linear_state(self.layer_idx, conv_state, state)
        return self.project_out(o, gate)
