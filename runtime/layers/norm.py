"""RMSNorm as used by Llama / Qwen teachers (normalise in fp32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from hyla.runtime.layers.fusion import fused
from hyla.runtime.ops import cpu_kernels, fla_modules


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.usable(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + a, the norm of it), in one pass on CPU and in CUDA training."""
        if cpu_kernels.usable(x, a, self.weight):
            return cpu_kernels.add_rms_norm(x, a, self.weight, self.eps)
        if fla_modules.applies(x):
            return fla_modules.rms_norm(a, self.weight, self.eps, residual=x)
        x = x + a
        return x, self(x)


@fused(training=fla_modules.rms_norm)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
