"""`DecodeGraphs`: CUDA graphs of the decode forward (one token per sequence), one per batch-size
bucket, captured at start-up and replayed with the batch padded up to its bucket.

Inputs live in static device buffers; the block tables and KV slots are derived inside the graph
from the runner's persistent block-table pool, so a replay costs one small host-to-device copy.
Padding rows point at the runner's scratch block and state slot.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from hyla.runtime.layers.fusion import fuse_always
from hyla.runtime.paged_context import PagedContext

if TYPE_CHECKING:
    from hyla.runtime.model_runner import ModelRunner
    from hyla.runtime.scheduler import ScheduledChunk


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    """Captured decode steps of `runner`'s model for batches of up to `max_batch` sequences."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        dev = runner.device
        # ids, positions, state slots, context lengths: one row each, written in one copy
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0

    def _forward(self, b: int) -> torch.Tensor:
        r = self.runner
        ids, pos, slots, lens = self.inputs[:, :b]
        ids = r.resolve_ids(ids)
        meta = r.metadata(ids, pos, slots, lens, None, 1)
        hidden = r.model.model(ids[None], PagedContext(meta, r.kv, r.states))[0]
        return r.model.lm_head(hidden)

    @torch.inference_mode()
    @fuse_always()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool; record the memory it took."""
        self.inputs[2] = self.runner.pad_slot
        self.inputs[3] = 1
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved(self.runner.device)
        pool = None
        for b in reversed(self.buckets):
            self._forward(b)  # compile / autotune outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved(self.runner.device) - before

    def run(self, chunks: list[ScheduledChunk], tokens: list[int]) -> torch.Tensor:
        """Logits `[len(chunks), V]` of one decode step of `tokens` (placeholders allowed, see
        `ModelRunner.resolve_ids`)."""
        n = len(chunks)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        pad = b - n
        host = (tokens + [0] * pad + [c.start for c in chunks] + [0] * pad
                + [c.seq.slot for c in chunks] + [self.runner.pad_slot] * pad + [c.end for c in chunks] + [1] * pad)
        self.inputs[:, :b] = self.runner.to_device(host).view(4, b)
        self.graphs[b].replay()
        return self.logits[b][:n]
