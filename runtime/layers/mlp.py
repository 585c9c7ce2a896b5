"""The teacher's gated MLP (gate/up/down projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from hyla.runtime.config import HybridConfig
from hyla.runtime.layers.projections import project
from hyla.runtime.layers.fusion import fused
from hyla.runtime.ops import cpu_kernels, fla_modules


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        h, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, m, bias=bias)
        self.up_proj = nn.Linear(h, m, bias=bias)
        self.down_proj = nn.Linear(m, h, bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act in ("silu", "swish")

    def input_projections(self) -> tuple[nn.Linear, ...]:
        return (self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, *self.input_projections())
        return self.down_proj(self.activate(gate, up))

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up; SiLU as one C++ op on CPU."""
        if not self.silu:
            return self.act(gate) * up
        if cpu_kernels.usable(gate, up):
            m = gate.shape[-1]
            return cpu_kernels.silu_mul(gate.reshape(-1, m), up.reshape(-1, m)).view(gate.shape)
        return silu_mul(gate, up)


@fused(training=fla_modules.swiglu)
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
