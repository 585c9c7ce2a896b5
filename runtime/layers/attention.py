"""The teacher's softmax attention (GQA, optional QKV bias, optional per-head q/k RMSNorm)."""

from __future__ import annotations

import torch
from torch import nn

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import ForwardContext
from hyla.runtime.layers.projections import project
from hyla.runtime.layers.norm import RMSNorm
from hyla.runtime.layers.rotary import apply_rotary
from hyla.runtime.ops import cpu_kernels


class SoftmaxAttention(nn.Module):
    """Parameter names and maths match Llama / Qwen2 / Qwen3 attention, so teacher weights load as is."""

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = project(x, *self.input_projections())
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope
        if cpu_kernels.usable(q, k, cos, sin):  # in place, one op (`view` refuses to copy)
            d = self.head_dim
            cos, sin = (c.expand(b, t, d).reshape(-1, d) for c in (cos, sin))  # tables may be shared by the batch
            cpu_kernels.rotary_(q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d), cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ctx.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(b, t, -1))
