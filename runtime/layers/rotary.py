"""Rotary position embeddings, with every RoPE scaling type transformers knows (llama3, yarn, ...)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hyla.runtime.layers.fusion import fused
from hyla.runtime.ops import fla_modules

from hyla.runtime.config import HybridConfig


def default_inv_freq(config: HybridConfig) -> torch.Tensor:
    """Inverse frequencies of unscaled RoPE."""
    dim = config.head_dim
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given positions and rotates q/k in `[B, T, H, D]` layout."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and the attention scaling of the configured RoPE type."""
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            return default_inv_freq(self.config), 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](self.config, None)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape `[*position_ids.shape, D]`, computed in fp32."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _training_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fla's one-kernel rotation where every row of a batch has the same positions (cos/sin `[1, T, D]`,
    as a training batch has), else the plain form. The tables take `x`'s dtype (fp32 tables, bf16 q/k
    under autocast), as transformers' Llama does."""
    if x.dim() == 4 and cos.dim() == 3 and cos.shape[:2] == (1, x.shape[1]):
        half = cos.shape[-1] // 2
        return fla_modules.rotary(x, cos[0, :, :half].to(x.dtype), sin[0, :, :half].to(x.dtype))
    return apply_rotary.plain(x, cos, sin)


@fused(training=_training_rotary)
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[..., T, H, D]` with cos/sin `[..., T, D]`."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
