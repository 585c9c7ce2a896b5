"""bf16 linear layers with oneDNN-prepacked weights for CPU inference.

`F.linear` on a bf16 CPU weight reorders the weight into oneDNN's blocked layout on every call,
which makes the small matrix-vector products of a decode step two to three times slower than the
memory bandwidth allows. `pack_linears` turns every `nn.Linear` of a model into a `PackedLinear`,
which keeps its parameters (and so `state_dict`, weight tying and training) as they are and adds
a packed copy of the weight, made on first use and remade whenever the weight changes. The copy
costs as much memory as the weights themselves. Set `HYLA_CPU_PACKED_LINEAR=0` to turn it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

PACK_DTYPES = (torch.bfloat16,)
PACK_BATCH_HINT = 1
"""Rows the packed layout is tuned for: decode steps (the packed product is exact at any row count)."""


def packing_enabled() -> bool:
    return os.environ.get("HYLA_CPU_PACKED_LINEAR", "1") != "0"


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN blocked copy of a `[out, in]` weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


class PackedLinear(nn.Linear):
    """`nn.Linear` that runs bf16 CPU inference (no autograd) on a packed copy of its weight."""

    _packed: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or w.device.type != "cpu" or w.dtype not in PACK_DTYPES or x.dtype != w.dtype:
            return F.linear(x, w, self.bias)
        return packed_linear(x, self.packed_weight(), self.bias)

    def packed_weight(self) -> torch.Tensor:
        """The packed weight, repacked when the weight's storage, version or dtype changed."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_weight(w))
        return self._packed[1]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight out (it cannot be serialised; it is remade on use)."""
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def pack_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `PackedLinear` (in place); returns how many.

    Does nothing when `HYLA_CPU_PACKED_LINEAR=0`.
    """
    if not packing_enabled():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            count += 1
    return count
