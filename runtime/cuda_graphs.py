"""CUDA graphs of the model's forward, captured at start-up and replayed with the batch padded to
its bucket: one host launch instead of a thousand.

`DecodeGraphs` cover decode steps (one token per sequence), one graph per batch-size bucket.
`ChunkGraphs` cover small packed steps — a short prefill chunk (a prompt's uncached suffix, a chat
turn), alone or beside decode tokens — one graph per (token bucket, chunk bucket). Eagerly such a
step is bound by the host: its kernels take a few milliseconds, their launches several times that.
A small step with a longer chunk runs as rounds of chunk-graph replays (`ModelRunner._replayed`).

Inputs live in static device buffers written by one host-to-device copy; block tables and KV slots
are derived inside the graph from the runner's persistent block-table pool. Padding points at the
runner's scratch block and state slot: padding decode rows are sequences of their own, and the
padding tokens of a chunk step form scratch sequences of at most `CHUNK_MAX_LEN` tokens (the
further padding sequences are empty).
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Hashable

import torch

from hyla.runtime.layers.fusion import fuse_always
from hyla.runtime.ops.dispatch import CUDA_RECURRENT_MAX_LEN
from hyla.runtime.paged_context import PagedContext

if TYPE_CHECKING:
    from hyla.runtime.model_runner import ModelRunner
    from hyla.runtime.scheduler import ScheduledChunk

CHUNK_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
"""Token counts of the chunk graphs."""
CHUNK_SEQ_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256)
"""Sequences of the chunk graphs, the padding sequence included."""
CHUNK_MAX_LEN = CUDA_RECURRENT_MAX_LEN
"""The longest chunk a chunk graph runs: linear layers take the one-kernel recurrent form up to it,
as eagerly (see `CUDA_RECURRENT_MAX_LEN`), so a replay runs the kernels an eager step would."""


def pieces(tokens: int) -> list[int]:
    """Lengths of the scratch sequences that hold `tokens` padding tokens: at least one sequence,
    none longer than `CHUNK_MAX_LEN`."""
    return [min(CHUNK_MAX_LEN, tokens - at) for at in range(0, tokens, CHUNK_MAX_LEN)] or [0]


def up_to(buckets: tuple[int, ...], limit: int) -> list[int]:
    """`buckets` up to the first that holds `limit` (all of them when none does)."""
    out = []
    for b in buckets:
        out.append(b)
        if b >= limit:
            break
    return out


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class CapturedSteps:
    """Graphs of `runner`'s forward, one per key of `keys`, sharing one memory pool."""

    def __init__(self, runner: ModelRunner, keys: list[Hashable]) -> None:
        self.runner = runner
        self.keys = keys
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Hashable, torch.Tensor] = {}
        self.memory_bytes = 0
        self.seconds = 0.0
        """How long `capture` took (warm-up forwards, kernel autotuning and compilation included)."""
        self.pool: object | None = None
        self.replays = 0
        """Steps run so far."""

    def forward(self, key: Hashable) -> torch.Tensor:
        """The step a graph of `key` captures, reading its static inputs."""
        raise NotImplementedError

    @torch.inference_mode()
    @fuse_always()
    def capture(self, pool: object | None = None) -> None:
        """Capture every key in order (largest first, so later graphs fit in the pool), in `pool`
        when given; record the memory and time it took."""
        began = time.perf_counter()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as capturing does: only the graphs' own memory counts
        before = torch.cuda.memory_reserved(self.runner.device)
        for key in self.keys:
            self.forward(key)  # compile / autotune outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self.forward(key)
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()
        self.pool = pool
        self.memory_bytes = torch.cuda.memory_reserved(self.runner.device) - before
        self.seconds = time.perf_counter() - began

    def replay(self, key: Hashable, host: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """Write `host` into the static `inputs` of `key`'s graph, replay it, return its output. Before
        `capture` (and on the CPU, where nothing is captured) the same padded step runs eagerly."""
        inputs.copy_(self.runner.to_device(host).view(inputs.shape), non_blocking=True)
        self.replays += 1
        graph = self.graphs.get(key)
        if graph is None:
            return self.forward(key)
        graph.replay()
        return self.outputs[key]


class DecodeGraphs(CapturedSteps):
    """Decode steps (logits) of batches of up to `max_batch` sequences."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        super().__init__(runner, list(reversed(self.buckets)))
        # ids, positions, state slots, context lengths: one row each, written in one copy
        self.inputs = torch.zeros(4, max_batch, dtype=torch.long, device=runner.device)
        self.inputs[2] = runner.pad_slot
        self.inputs[3] = 1

    def forward(self, b: int) -> torch.Tensor:
        r = self.runner
        ids, pos, slots, lens = self.inputs[:, :b]
        ids = r.resolve_ids(ids)
        meta = r.metadata(ids, pos, slots, lens, None, 1)
        hidden = r.model.model(ids[None], PagedContext(meta, r.kv, r.states))[0]
        return r.model.lm_head(hidden)

    def run(self, chunks: list[ScheduledChunk], tokens: list[int]) -> torch.Tensor:
        """Logits `[len(chunks), V]` of one decode step of `tokens` (placeholders allowed, see
        `ModelRunner.resolve_ids`)."""
        n = len(chunks)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        pad = b - n
        host = (tokens + [0] * pad + [c.start for c in chunks] + [0] * pad
                + [c.seq.slot for c in chunks] + [self.runner.pad_slot] * pad + [c.end for c in chunks] + [1] * pad)
        return self.replay(b, host, self.inputs[:, :b])[:n]


class ChunkGraphs(CapturedSteps):
    """Packed steps (final hidden states) of chunks of at most `CHUNK_MAX_LEN` tokens, at most
    `max_tokens` in all (see `key`)."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.token_buckets = up_to(CHUNK_TOKEN_BUCKETS, max_num_batched_tokens)
        self.seq_buckets = up_to(CHUNK_SEQ_BUCKETS, max_num_seqs + 1)
        self.max_tokens, self.max_seqs = self.token_buckets[-1], self.seq_buckets[-1]
        # t tokens come in at least len(pieces(t)) chunks and at most t, plus a scratch sequence
        keys = [(t, n) for t in reversed(self.token_buckets)
                for n in reversed(up_to(tuple(self.seq_buckets), t + 1)) if n >= len(pieces(t))]
        super().__init__(runner, keys)
        # captured on a step of scratch sequences alone
        self.inputs = {key: torch.tensor(self._layout(key, [], [], []), device=runner.device) for key in keys}

    def _layout(
        self, key: tuple[int, int], chunks: list[ScheduledChunk], tokens: list[int], positions: list[int]
    ) -> list[int]:
        """The static inputs of graph `key` for a step: ids and positions of every token, then state
        slots, context and query lengths of every sequence; the padding tokens form scratch sequences."""
        t, n = key
        pad = pieces(t - len(tokens))
        lens = pad + [0] * (n - len(chunks) - len(pad))
        return (tokens + [0] * (t - len(tokens)) + positions + [p for q in pad for p in range(q)]
                + [c.seq.slot for c in chunks] + [self.runner.pad_slot] * (n - len(chunks))
                + [c.end for c in chunks] + lens + [c.num_tokens for c in chunks] + lens)

    def key(self, num_chunks: int, num_tokens: int, longest: int) -> tuple[int, int] | None:
        """The graph of a step of `num_chunks` chunks, `num_tokens` tokens in all and `longest` at most
        in one, or None when no graph holds it."""
        if num_tokens > self.max_tokens or longest > CHUNK_MAX_LEN:
            return None
        t = self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]
        need = num_chunks + len(pieces(t - num_tokens))
        if need > self.max_seqs:
            return None
        return t, self.seq_buckets[bisect.bisect_left(self.seq_buckets, need)]

    def forward(self, key: tuple[int, int]) -> torch.Tensor:
        t, n = key
        r = self.runner
        ids, pos, rest = self.inputs[key].split([t, t, 3 * n])
        slots, lens, qlens = rest.view(3, n)
        ids = r.resolve_ids(ids)
        meta = r.metadata(ids, pos, slots, lens, qlens, min(t, CHUNK_MAX_LEN))
        return r.model.model(ids[None], PagedContext(meta, r.kv, r.states))[0]

    def run(
        self, key: tuple[int, int], chunks: list[ScheduledChunk], tokens: list[int], positions: list[int]
    ) -> torch.Tensor:
        """Final hidden states `[len(tokens), hidden]` of the packed `chunks` through graph `key`."""
        host = self._layout(key, chunks, tokens, positions)
        return self.replay(key, host, self.inputs[key])[: len(tokens)]
