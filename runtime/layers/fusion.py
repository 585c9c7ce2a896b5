"""Elementwise pieces of the layers compiled into fused kernels for CUDA inference.

A decode step of a small model is bound by kernel count, not bytes: RMSNorm, RoPE, gates and
activations written as plain PyTorch take several kernels each. `fused(fn)` runs `fn` through
`torch.compile` (one dynamic-shape compile per function) when its first argument is a CUDA tensor
and no gradient is being recorded, and runs the plain function everywhere else — which stays the
reference the tests compare against. `HYLA_FUSION=0` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def fusion_enabled() -> bool:
    return os.environ.get("HYLA_FUSION", "1") != "0"


def fused(fn: F) -> F:
    """`fn` compiled for CUDA inference, plain otherwise."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def run(*args: torch.Tensor):
        nonlocal compiled
        if args[0].is_cuda and not torch.is_grad_enabled() and fusion_enabled():
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(*args)
        return fn(*args)

    run.plain = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
