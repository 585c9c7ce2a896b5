"""The training loop every stage shares: AdamW (fused on CUDA), warmup + cosine lr, the whole step
(forward, backward, clipping, update) replayed from a CUDA graph (`graphed.py`), progress (tqdm or
plain log lines), loss curve, and resumable checkpoints of the trained parameters and optimizer,
written in the background while training goes on."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from hyla.convert.checkpoint_writer import BackgroundSaver
from hyla.convert.data import BatchStream
from hyla.convert.distributed import Dist
from hyla.convert.graphed import TrainStep, device_lr, graphs_wanted, set_lr
from hyla.convert.students import autocast


@dataclass
class StageResult:
    """Loss curve `[(step, loss)]`, tokens trained on (all ranks) and wall seconds."""

    curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    steady_tokens_per_s: float | None = None
    """The rate after the first tenth of the steps the last run took (kernel compilation, autotuning
    and allocator warm-up left out); None when that run took fewer than two steps."""
    graphed: bool = False
    """Whether the last run's steps replayed a CUDA graph (`graphed.py`)."""

    def summary(self) -> dict:
        return {
            "steps": len(self.curve),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "steady_tokens_per_s": round(self.steady_tokens_per_s, 1) if self.steady_tokens_per_s else None,
            "graphed": self.graphed,
            "final_loss": self.curve[-1][1] if self.curve else None,
            "curve": self.curve,
        }


@dataclass(frozen=True)
class LoopSettings:
    """How a stage's loop runs: optimizer steps, lr warmup, resumable checkpoint, progress display."""

    steps: int
    dist: Dist
    warmup: int = 0
    checkpoint: Path | None = None
    checkpoint_every: int = 0
    quiet: bool = False


def adamw(params: Iterable, device: torch.device, lr: float = 1e-3) -> torch.optim.AdamW:
    """AdamW as every stage runs it (no weight decay, betas 0.9 / 0.95), one fused kernel on CUDA,
    where it can be captured in a CUDA graph; `params` may be parameter groups with their own lr."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), fused=cuda, capturable=cuda)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    stream: BatchStream,
    run: LoopSettings,
    clip: float | None = 1.0,
) -> StageResult:
    """Minimise `loss_fn(batch)` (under autocast) on `stream`'s batches for `run.steps` optimizer steps;
    on one CUDA device each step (clipping and update included) replays a CUDA graph after the first.

    With `run.checkpoint`, the trainable state, optimizer, curve and elapsed time are saved every
    `run.checkpoint_every` steps, and a rerun continues from the last one.
    """
    steps, dist, checkpoint, quiet = run.steps, run.dist, run.checkpoint, run.quiet
    tokens_per_step = stream.batch_size * stream.blocks.shape[1]
    result, start = StageResult(), 0
    peaks = [g["lr"] for g in optimizer.param_groups]
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=dist.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        curve = [tuple(p) for p in saved["curve"]]
        start, result = saved["step"], StageResult(curve, saved["tokens"], saved["seconds"])
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with autocast(dist.device):
            return loss_fn(ids)

    def update() -> None:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()

    graphed = graphs_wanted(dist.device, dist.world)
    if graphed:
        device_lr(optimizer)
    train_step = TrainStep(forward, update, params, graphed)
    saver = BackgroundSaver()
    bar = tqdm(
        total=steps, initial=start, desc=name, unit="step", disable=quiet or not dist.is_main, file=sys.stderr,
        dynamic_ncols=True,
    )
    log_every = max(1, steps // 10)
    began = time.perf_counter() - result.seconds
    warm_until, warm = start + max(1, (steps - start) // 10), None

    def record(step: int, read_loss: Callable[[], float]) -> None:
        nonlocal warm
        loss = dist.mean(read_loss())
        result.curve.append((step, round(loss, 6)))
        result.tokens += tokens_per_step
        result.seconds = time.perf_counter() - began
        rate = result.tokens / result.seconds
        if step + 1 == warm_until:
            warm = (result.tokens, result.seconds)
        elif warm is not None:
            result.steady_tokens_per_s = (result.tokens - warm[0]) / (result.seconds - warm[1])
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if quiet and dist.is_main and ((step + 1) % log_every == 0 or step + 1 == steps):
            eta = (steps - step - 1) * result.seconds / max(1, step + 1 - start)
            print(f"[{name}] step {step + 1}/{steps} loss {loss:.4f} {rate:.0f} tok/s eta {eta:.0f}s", file=sys.stderr)

    # A step's loss is read after the next step is queued, so the device never waits for the host.
    pending: tuple[int, Callable[[], float]] | None = None
    model.train()
    try:
        for step in range(start, steps):
            for group, peak in zip(optimizer.param_groups, peaks):
                set_lr(group, peak * lr_factor(step, steps, run.warmup))
            batch_loss = train_step(_to_device(stream(step), dist.device))
            if pending is not None:
                record(*pending)
            pending = (step, _read_later(batch_loss))
            due = step + 1 == steps or (run.checkpoint_every and (step + 1) % run.checkpoint_every == 0)
            if checkpoint is not None and due:
                record(*pending)
                pending = None
                if dist.is_main:
                    saver.save(checkpoint, {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step + 1,
                        "curve": list(result.curve),
                        "tokens": result.tokens,
                        "seconds": result.seconds,
                    })
        if pending is not None:
            record(*pending)
    finally:  # an interrupted stage still finishes writing its last checkpoint
        saver.close()
    result.graphed = train_step.graph is not None
    bar.close()
    model.eval()
    return result


def _to_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; to CUDA from pinned memory without blocking (the copy queues)."""
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)


def _read_later(value: torch.Tensor) -> Callable[[], float]:
    """A reader of the scalar `value` that, on CUDA, waits for the work queued before it, not after
    (a non-blocking copy to pinned memory, and an event)."""
    if not value.is_cuda:
        return lambda: float(value)
    host = torch.empty((), dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> float:
        copied.synchronize()
        return float(host)

    return read
