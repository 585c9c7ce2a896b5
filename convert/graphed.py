"""A training step — forward, backward and parameter update — replayed from one CUDA graph.

Eagerly, a distillation step of a small student is bound by the host, not the device: the teacher's
forward, fla's Python around every Gated DeltaNet layer and the backward of each launch thousands of
small kernels. Every step runs the same shapes, so after a few eager steps (which also autotune the
Triton kernels and create the optimizer's state) the step is captured once, and each later step is
one replay. The update (clipping, the fused AdamW) is captured with it: it reads its lr from a
device tensor (`device_lr`) that the loop rewrites before each step. A batch of another shape, a
step that cannot be captured (one that syncs with the host) and a CPU device run eagerly: still
correct, only slower.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def graphs_wanted(device: torch.device, world: int) -> bool:
    """Whether training steps on `device` should be graphed: on CUDA, in one process (DDP's
    all-reduce hooks stay eager), unless `HYLA_TRAIN_GRAPHS=0`."""
    return device.type == "cuda" and world == 1 and os.environ.get("HYLA_TRAIN_GRAPHS", "1") != "0"


def device_lr(optimizer: torch.optim.Optimizer) -> None:
    """Give each of `optimizer`'s param groups its lr as a one-element tensor on the parameters'
    device, so that a captured update reads the value written before each replay (`set_lr`)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def set_lr(group: dict, value: float) -> None:
    """Set a param group's lr, in place when it is a tensor (`device_lr`)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class TrainStep:
    """`step(ids)`: the loss of `loss_fn(ids)`, after its backward and `update()` (clipping and the
    optimizer's step, with the gradients the backward left in the parameters' `.grad`).

    With `graphed`, the first `warmup` CUDA steps run eagerly on a side stream, the next is captured,
    and later ones of the same shape replay the capture; the returned loss is then the graph's own
    tensor, overwritten by the next replay (read it, or copy it, before that). A captured `update`
    must take its changing values (the lr) from device tensors."""

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        update: Callable[[], None],
        params: Sequence[nn.Parameter],
        graphed: bool,
        warmup: int = 2,
    ) -> None:
        self.loss_fn, self.update, self.params, self.warmup = loss_fn, update, list(params), warmup
        self.eager = not graphed
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_ids: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graph is not None and ids.shape == self.static_ids.shape:
            self.static_ids.copy_(ids)
            self.graph.replay()
            return self.static_loss
        if self.eager or self.graph is not None or not ids.is_cuda:
            return self._run(ids)
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self._on_side_stream(ids)
        self._capture(ids)
        return self(ids)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            if self.graph is not None and p.grad is not None:
                p.grad.zero_()  # the graph's gradient tensors stay where the optimizer finds them
            else:
                p.grad = None
        loss = self.loss_fn(ids)
        loss.backward()
        self.update()
        return loss.detach()

    def _on_side_stream(self, ids: torch.Tensor) -> torch.Tensor:
        """An eager step on a side stream, as warm-up before a capture must be."""
        main = torch.cuda.current_stream(ids.device)
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self._run(ids)
        main.wait_stream(side)
        return loss

    def _capture(self, ids: torch.Tensor) -> None:
        for p in self.params:
            p.grad = None
        torch.cuda.empty_cache()  # the graph's own memory pool takes what eager steps had cached
        static_ids, graph = ids.clone(), torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_loss = self.loss_fn(static_ids)
                static_loss.backward()
                self.update()
        except RuntimeError as exc:  # a host sync or an uncapturable op: stay eager, still correct
            torch.cuda.synchronize(ids.device)
            logger.warning("training eagerly: the step cannot be captured in a CUDA graph (%s)", exc)
            self.eager = True
            for p in self.params:
                p.grad = None
            return
        self.graph, self.static_ids, self.static_loss = graph, static_ids, static_loss.detach()
