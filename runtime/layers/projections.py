"""Several linear layers of one input run as one product.

q/k/v, gate/up and a linear mixer's input projections all read the same activations. One by one
they cost a kernel each (a decode step of a small model is bound by kernel count) plus a
concatenation. `stack_projections` moves each layer's `input_projections()` into one weight tensor
whose rows the linears keep as their parameters (views: no extra memory, `state_dict` unchanged in
values), and `project_groups` then runs them as one product and splits it. On CPU the oneDNN-packed
copies of :mod:`.cpu_linear` take precedence; anything not stacked runs layer by layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hyla.runtime.layers.cpu_linear import concat_parameters, packed_product

TRAINING_ALIGN = 16
"""Rows the training product's weight is padded to a multiple of (zeros, cut from the output):
cuBLAS runs bf16 products of widths that are not multiples of 8 on slow unaligned kernels (a Gated
DeltaNet layer's 2,322 projection columns ran at about 180 TFLOP/s on an H200)."""


class Stack(NamedTuple):
    """The stacked weight (and bias) of `linears`, and where their parameters must still live."""

    linears: tuple[nn.Linear, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None
    pointers: tuple[tuple[int, int | None], ...]

    def serves(self, linears: tuple[nn.Module, ...]) -> bool:
        """Whether this stack is exactly `linears`, whose parameters are still its views."""
        return self.linears == linears and self.pointers == _pointers(linears)


def _pointers(linears: tuple[nn.Module, ...]) -> tuple[tuple[int, int | None], ...]:
    return tuple((m.weight.data_ptr(), None if m.bias is None else m.bias.data_ptr()) for m in linears)


def stack_linears(linears: tuple[nn.Linear, ...]) -> None:
    """Make the weights (and biases) of `linears`, which share an input, rows of one tensor; a
    no-op when they already are (captured CUDA graphs keep reading that tensor)."""
    stack = getattr(linears[0], "stack", None)
    if stack is not None and stack.serves(linears):
        return
    with torch.no_grad():
        weight, bias = concat_parameters(linears)
    at = 0
    for m in linears:
        rows = slice(at, at + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=m.bias.requires_grad)
        at += m.out_features
    linears[0].stack = Stack(linears, weight, bias, _pointers(linears))


def stack_projections(model: nn.Module) -> int:
    """Stack the `input_projections()` of every layer of `model` that declares them; returns how many."""
    count = 0
    for module in model.modules():
        group = getattr(module, "input_projections", None)
        if group is not None:
            stack_linears(group())
            count += 1
    return count


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """`tuple(m(x) for m in linears)`, as one product (and views of it) when possible."""
    return project_groups(x, *((m,) for m in linears))


def project_groups(x: torch.Tensor, *groups: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Per group, its linears' outputs of `x` concatenated (`torch.cat([m(x) for m in group], -1)`);
    every group from one product (and views of it) when the linears are packed, or stacked and no
    gradient is recorded (the stacked tensor is not the parameters autograd tracks). While a gradient
    is recorded, plain linears run as one product over their weights concatenated by autograd (and
    padded to an aligned width): in a training step of a small model every kernel launch counts."""
    linears = tuple(m for group in groups for m in group)
    out = packed_product(x, linears)
    if out is None:
        stack = getattr(linears[0], "stack", None)
        if torch.is_grad_enabled() and len(linears) > 1 and all(type(m) is nn.Linear for m in linears):
            out = F.linear(x, *concat_parameters(linears, TRAINING_ALIGN))
        elif stack is None or torch.is_grad_enabled() or not stack.serves(linears):
            return tuple(g[0](x) if len(g) == 1 else torch.cat([m(x) for m in g], -1) for g in groups)
        else:
            out = F.linear(x, stack.weight, stack.bias)
    sizes = [sum(m.out_features for m in group) for group in groups]
    return out.split([*sizes, out.shape[-1] - sum(sizes)], -1)[: len(groups)]  # padding columns dropped
