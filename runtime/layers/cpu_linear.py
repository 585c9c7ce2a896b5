"""bf16 linear layers with prepacked weights for CPU inference.

`F.linear` on a bf16 CPU weight reorders the weight into oneDNN's blocked layout on every call,
which makes the small matrix-vector products of a decode step two to three times slower than the
memory bandwidth allows. `pack_linears` turns every `nn.Linear` of a model into a `PackedLinear`,
which keeps its parameters (and so `state_dict`, weight tying and training) as they are and adds
a packed copy of the weight, made on first use and remade whenever the weight changes. The copy
costs as much memory as the weights themselves. On CPUs with AVX512-BF16 the copy is laid out for
hyla's own kernel (:mod:`hyla.runtime.ops.cpu_kernels`), which reads it at close to memory bandwidth
for a few rows and matches oneDNN on prefill; elsewhere it is oneDNN's, which is exact to
`F.linear`. `packed_product` runs several packed linears of one input (q/k/v, gate/up, a linear
mixer's input projections) as one product over their stacked weights, which is exact and faster
than one small product each. Set `HYLA_CPU_PACKED_LINEAR=0` to turn packing off.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hyla.runtime.ops import cpu_kernels

PACK_DTYPES = (torch.bfloat16,)
PACK_BATCH_HINT = 1
"""Rows oneDNN's packed layout is tuned for: decode steps (the packed product is exact at any row count)."""


class Packed(NamedTuple):
    """A weight packed for one backend: hyla's kernel or oneDNN."""

    weight: torch.Tensor
    out_features: int
    hyla: bool


def packing_enabled() -> bool:
    return os.environ.get("HYLA_CPU_PACKED_LINEAR", "1") != "0"


def packed_linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight packed by `pack_weight`."""
    if packed.hyla:
        return cpu_kernels.packed_linear(x, packed.weight, bias, packed.out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed.weight, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> Packed:
    """Packed copy of a `[out, in]` bf16 weight: for hyla's kernel where this CPU runs it, else oneDNN's."""
    weight = weight.detach()
    if weight.shape[1] % 2 == 0 and cpu_kernels.linear_supported():
        return Packed(cpu_kernels.pack_linear(weight), weight.shape[0], True)
    return Packed(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT), weight.shape[0], False)


def contents_key(t: torch.Tensor | None) -> tuple[int, int, torch.dtype] | None:
    """Identifies a tensor's current contents: storage, in-place version and dtype."""
    return None if t is None else (t.data_ptr(), t._version, t.dtype)


class PackedLinear(nn.Linear):
    """`nn.Linear` that runs bf16 CPU inference (no autograd) on a packed copy of its weight."""

    _packed: tuple[object, Packed] | None = None
    _stacked: tuple[object, Packed, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packs(x):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed_weight(), self.bias)

    def packs(self, x: torch.Tensor) -> bool:
        """Whether `x` runs on the packed weight: CPU inference in a packed dtype."""
        w = self.weight
        return not torch.is_grad_enabled() and w.is_cpu and w.dtype in PACK_DTYPES and x.dtype == w.dtype

    def packed_weight(self) -> Packed:
        """The packed weight, repacked when the weight's storage, version or dtype changed."""
        key = contents_key(self.weight)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_weight(self.weight))
        return self._packed[1]

    def stacked_weight(self, linears: tuple[PackedLinear, ...]) -> tuple[Packed, torch.Tensor | None]:
        """Packed weight and bias of `linears` (this layer first) stacked along the output, kept here."""
        key = tuple((contents_key(m.weight), contents_key(m.bias)) for m in linears)
        if self._stacked is None or self._stacked[0] != key:
            with torch.no_grad():
                weight, bias = concat_parameters(linears)
            self._stacked = (key, pack_weight(weight), bias)
        return self._stacked[1], self._stacked[2]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight out (it cannot be serialised; it is remade on use)."""
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_stacked", None)
        return state


def concat_parameters(linears: tuple[nn.Linear, ...], align: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of `linears` stacked along the output, and their biases (zeros where a layer has
    none; None when no layer has one), with zero rows after them up to a multiple of `align`; under
    autograd when a gradient is being recorded."""
    rows = sum(m.out_features for m in linears)
    pad = -rows % align
    first = linears[0].weight
    weight = torch.cat([m.weight for m in linears] + ([first.new_zeros(pad, first.shape[1])] if pad else []))
    if all(m.bias is None for m in linears):
        return weight, None
    biases = [first.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears]
    return weight, torch.cat(biases + ([first.new_zeros(pad)] if pad else []))


def packed_product(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """`torch.cat([m(x) for m in linears], -1)` as one product over their stacked packed weights, or
    None when they do not all run packed on `x`."""
    first = linears[0]
    if not (isinstance(first, PackedLinear) and first.packs(x) and all(type(m) is PackedLinear for m in linears)):
        return None
    return packed_linear(x, *first.stacked_weight(linears))


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
