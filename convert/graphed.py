"""A no-grad forward replayed from a CUDA graph: the teacher's pass in every distillation step.

The teacher runs the same input shape step after step, and eagerly its forward costs the host more
time than the device (hundreds of small kernels a layer); a training step of a small student is
bound by that host time. Captured once, each replay is one launch.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)


class GraphedForward:
    """`fn(ids)` without gradients, replayed from a graph captured on the first CUDA call. Inputs of
    another shape or device, and a forward that cannot be captured, run eagerly. Returns a fresh
    tensor each call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: torch.Tensor | None = None
        self.static_out: torch.Tensor | None = None
        self.eager = False

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not ids.is_cuda or self.eager:
            return self.fn(ids)
        if self.graph is None:
            self._capture(ids)
            if self.graph is None:
                return self.fn(ids)
        if ids.shape != self.static_in.shape or ids.device != self.static_in.device:
            return self.fn(ids)
        self.static_in.copy_(ids)
        self.graph.replay()
        return self.static_out.clone()

    def _capture(self, ids: torch.Tensor) -> None:
        static_in = ids.clone()
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
            torch.cuda.current_stream(ids.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_in)
        except RuntimeError as exc:  # a host sync or an uncapturable op: stay eager, still correct
            torch.cuda.synchronize(ids.device)
            logger.warning("running the teacher eagerly: its forward cannot be captured (%s)", exc)
            self.eager = True
            return
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
