"""One pre-norm decoder block: mixer (softmax or linear attention) then the gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from hyla.runtime.config import HybridConfig
from hyla.runtime.context import ForwardContext
from hyla.runtime.layers import cpu_halves
from hyla.runtime.layers.attention import SoftmaxAttention
from hyla.runtime.layers.gated_deltanet import GatedDeltaNet
from hyla.runtime.layers.gla import GatedLinearAttention
from hyla.runtime.layers.mlp import GatedMLP
from hyla.runtime.layers.norm import RMSNorm

MIXERS: dict[str, type[nn.Module]] = {
    "attention": SoftmaxAttention,
    "gdn": GatedDeltaNet,
    "gla": GatedLinearAttention,
}


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(x)). The mixer is always named `self_attn`."""

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MIXERS[self.layer_type](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        a = cpu_halves.mixer_half(self.self_attn, self.input_layernorm, x, ctx)
        if a is None:
            a = self.self_attn(self.input_layernorm(x), ctx)
        out = cpu_halves.mlp_residual(self.mlp, self.post_attention_layernorm, x, a)
        if out is not None:
            return out
        x, h = self.post_attention_layernorm.add_forward(x, a)
        return x + self.mlp(h)
