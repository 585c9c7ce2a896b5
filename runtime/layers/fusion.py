"""Elementwise pieces of the layers compiled into fused kernels for CUDA inference, and run as fla's
fused Triton modules in CUDA training.

A decode step of a small model is bound by kernel count, not bytes: RMSNorm, RoPE, gates and
activations written as plain PyTorch take several kernels each. `fused(fn)` runs `fn` through
`torch.compile` (one dynamic-shape compile per function) when its first argument is a CUDA tensor
and no gradient is being recorded, and runs the plain function everywhere else — which stays the
reference the tests compare against. `HYLA_FUSION=0` turns it off. `fused(training=g)` runs `g`
instead wherever `fla_modules.applies` (autograd recording on CUDA, where fla trains).

A compiled call costs more host time than the few plain kernels it replaces (guards, wrappers),
which only pays where the device, not the host, is the bottleneck: inside a CUDA graph (the host
work is paid once, at capture; see `fuse_always`) or on large tensors. Eager calls on fewer than
`MIN_EAGER_NUMEL` elements run plain: measured on an H200, a 1B model's eager prefill step of
1,024 tokens is bound by the host even then (its kernels keep the GPU busy an eighth of it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Callable, TypeVar

import torch

from hyla.runtime.ops import fla_modules

logger = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64
"""Compiled variants per function (dtypes, ranks); the default of 8 is too few for a whole model zoo."""
MIN_EAGER_NUMEL = 1 << 25
"""Elements of the first argument from which an eager call takes the compiled form: below it the
plain kernels' device time is smaller than the compiled call's host time."""

_always: ContextVar[bool] = ContextVar("hyla_fuse_always", default=False)

F = TypeVar("F", bound=Callable)


def fusion_enabled() -> bool:
    return os.environ.get("HYLA_FUSION", "1") != "0"


@contextlib.contextmanager
def fuse_always() -> Iterator[None]:
    """Take the compiled form whatever the size (CUDA-graph warm-up and capture)."""
    token = _always.set(True)
    try:
        yield
    finally:
        _always.reset(token)


def fused(fn: F | None = None, *, training: Callable | None = None) -> F | Callable[[F], F]:
    """`fn` compiled for CUDA inference, `training` (same arguments) where fla's training modules
    apply, plain otherwise. Used bare (`@fused`) or with `training` (`@fused(training=g)`)."""
    if fn is None:
        return functools.partial(fused, training=training)
    compiled: Callable | None = None
    broken = False

    @functools.wraps(fn)
    def run(*args: torch.Tensor):
        nonlocal compiled, broken
        x = args[0]
        if training is not None and fla_modules.applies(x):
            return training(*args)
        if (x.is_cuda and not torch.is_grad_enabled() and fusion_enabled() and not broken
                and (_always.get() or x.numel() >= MIN_EAGER_NUMEL)):
            if compiled is None:
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            try:
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as exc:  # stay correct: fall back for good
                logger.warning("running %s unfused: %s", fn.__name__, exc)
                broken = True
        return fn(*args)

    run.plain = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
