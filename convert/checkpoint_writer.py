"""Resume checkpoints written in the background: training goes on while the file is written."""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch


class BackgroundSaver:
    """Writes checkpoints on a thread of its own: `save` queues copies of the state into host
    buffers (pinned, reused from save to save) and returns; the file is written (to a temporary
    name, then renamed) once the copies land, while training goes on. At most one write is in
    flight; `close` waits for it, and a failed write raises in `save` or `close`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hyla-checkpoint")
        self._pending: Future | None = None
        self._buffers: list[torch.Tensor] = []
        self._queued = False
        """Whether the state being saved had CUDA tensors (copies queued on the device)."""

    def save(self, path: Path, state: dict) -> None:
        self._wait()
        self._queued = False
        host = self._to_host(state, itertools.count())
        copied = None
        if self._queued:
            copied = torch.cuda.Event()
            copied.record()
        self._pending = self._pool.submit(_write, path, host, copied)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _to_host(self, obj: Any, slots: Iterator[int]) -> Any:
        """`obj` with every tensor copied to host memory (the originals keep training)."""
        if isinstance(obj, torch.Tensor):
            return self._copy(next(slots), obj.detach())
        if isinstance(obj, dict):
            return {k: self._to_host(v, slots) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_host(v, slots) for v in obj)
        return obj

    def _copy(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t.clone()
        self._queued = True
        self._buffers.extend(torch.empty(0) for _ in range(slot + 1 - len(self._buffers)))
        buf = self._buffers[slot]
        if buf.shape != t.shape or buf.dtype != t.dtype or not buf.is_pinned():
            buf = self._buffers[slot] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)


def _write(path: Path, state: dict, copied: torch.cuda.Event | None) -> None:
    if copied is not None:
        copied.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)
