"""`ModelRunner`: owns the cache tensors, prepares each step's inputs on the device, runs the model
(eagerly, or a captured CUDA graph for decode and small packed steps) and samples the next tokens on the device."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hyla.runtime.cache_budget import CachePlan
from hyla.runtime.cuda_graphs import CHUNK_MAX_LEN, ChunkGraphs, DecodeGraphs
from hyla.runtime.kv_cache import PagedKVCache
from hyla.runtime.cpu_memory import keep_freed_memory
from hyla.runtime.layers.cpu_linear import pack_linears
from hyla.runtime.layers.projections import stack_projections
from hyla.runtime.logprobs import Scores, score_tokens
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.outputs import TokenLogprobs
from hyla.runtime.ops.paged_attention import triton_supports
from hyla.runtime.paged_context import PagedContext, StepMetadata
from hyla.runtime.sampler import sample
from hyla.runtime.sampling_params import SamplingParams
from hyla.runtime.scheduler import ScheduledChunk
from hyla.runtime.state_pool import StatePool


@dataclass
class ChunkWork:
    """What the engine wants from one scheduled chunk beyond running it."""

    chunk: ScheduledChunk
    prompt_rows: list[int]
    """Chunk-relative rows whose log-probabilities score the prompt."""
    draws: list[tuple[SamplingParams, int]]
    """(params, seed) of each token to draw from the chunk's last row."""
    score_last: bool = False
    """Return the last row's log-probabilities too (they score the drawn tokens)."""

    @property
    def logprob_rows(self) -> list[int]:
        return self.prompt_rows + ([self.chunk.num_tokens - 1] if self.score_last else [])


@dataclass
class ChunkResult:
    tokens: list[int]
    prompt_logprobs: list[TokenLogprobs]
    """Entries for the next prompt token of each of `prompt_rows` (empty when none were asked for)."""
    logprobs: list[TokenLogprobs]
    """Entries for each drawn token when `score_last`, else empty."""


@dataclass
class LaunchedStep:
    """A step whose kernels are queued: its drawn tokens and scores are on their way to pinned host
    memory; `results()` waits for them (and only for them)."""

    work: list[ChunkWork]
    tokens: torch.Tensor | None
    """`[D]` drawn tokens, in draw order, on the host (once `done` has fired)."""
    scores: Scores | None
    """Every chunk's scored prompt tokens, then its scored draws, concatenated."""
    top_n: list[int]
    """How many best tokens each scored row reports."""
    done: torch.cuda.Event | None

    def results(self) -> list[ChunkResult]:
        if self.done is not None:
            self.done.synchronize()
        tokens = self.tokens.tolist() if self.tokens is not None else []
        entries = self.scores.entries(self.top_n) if self.scores is not None else []
        out, used, at = [], 0, 0
        for w in self.work:
            prompt, draws = len(w.prompt_rows), len(w.draws) if w.score_last else 0
            out.append(ChunkResult(tokens[used : used + len(w.draws)], entries[at : at + prompt],
                                   entries[at + prompt : at + prompt + draws]))
            at += prompt + draws
            used += len(w.draws)
        return out


class ModelRunner:
    """Runs `HybridForCausalLM`'s own layers under a `PagedContext`; the LM head only on needed rows.

    The state pool has a row for every state slot and prefix-cache snapshot; it and the KV pool hold
    one extra block and row that padding rows of a CUDA-graph batch write to. Each sequence's block
    table lives in row `slot` of a device tensor and only entries that changed are written each step.
    """

    def __init__(
        self,
        model: HybridForCausalLM,
        plan: CachePlan,
        dtype: torch.dtype,
        state_dtype: torch.dtype,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        stack_projections(model)
        if self.device.type == "cpu":
            pack_linears(model)
            keep_freed_memory()
        self.block_size = plan.block_size
        self.max_model_len = plan.max_model_len
        rows = plan.num_slots + plan.num_snapshot_rows
        self.pad_block, self.pad_slot = plan.num_blocks, rows
        self.kv = PagedKVCache(model.config, plan.num_blocks + 1, plan.block_size, dtype, self.device)
        self.states = StatePool(model.config, rows + 1, dtype, state_dtype, self.device)
        self.max_blocks = math.ceil(plan.max_model_len / plan.block_size)
        self.block_pool = torch.full(
            (rows + 1, self.max_blocks), self.pad_block, dtype=torch.int32, device=self.device
        )
        self._pin = self.device.type == "cuda"
        self.drawn = torch.zeros(plan.num_slots, dtype=torch.long, device=self.device)
        """The last step's drawn tokens: inputs the host does not know yet are read from here."""
        self.graphs = self.chunk_graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self, max_num_seqs)
            self.graphs.capture()
            config = model.config
            graph_safe = not config.softmax_layers or triton_supports(dtype, config.head_dim)  # the prefill attention
            if graph_safe and plan.max_model_len >= CHUNK_MAX_LEN:  # scratch sequences need as many positions
                self.chunk_graphs = ChunkGraphs(self, max_num_seqs, max_num_batched_tokens)
                self.chunk_graphs.capture(self.graphs.pool)
        self.warm_up_seconds = self._warm_up(max_num_batched_tokens) if self.device.type == "cuda" else 0.0

    # ---- input preparation ----------------------------------------------------------------------

    def to_device(self, values: list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long, pin_memory=self._pin)
        return host.to(self.device, non_blocking=True)

    def _sync_block_tables(self, chunks: list[ScheduledChunk]) -> None:
        """Write the block-table entries that changed since a sequence's last step."""
        rows, cols, blocks = [], [], []
        for c in chunks:
            seq = c.seq
            if seq.synced_blocks < len(seq.block_table):
                for j in range(seq.synced_blocks, len(seq.block_table)):
                    rows.append(seq.slot)
                    cols.append(j)
                    blocks.append(seq.block_table[j])
                seq.synced_blocks = len(seq.block_table)
        if rows:
            r, col, b = self.to_device(rows + cols + blocks).split(len(rows))
            self.block_pool[r, col] = b.to(torch.int32)

    def resolve_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids with each placeholder `-1 - row` replaced by the token drawn into `row` (graph-safe)."""
        return torch.where(ids < 0, self.drawn[(-1 - ids).clamp_min(0)], ids)

    def metadata(
        self, input_ids: torch.Tensor, positions: torch.Tensor, state_idx: torch.Tensor,
        context_lens: torch.Tensor, query_lens: torch.Tensor | None, max_query_len: int,
        max_context_len: int | None = None,
    ) -> StepMetadata:
        """Device metadata from per-token ids/positions and per-chunk slots/lengths (graph-safe:
        no host syncs; `query_lens` None means one token per chunk). `max_context_len` bounds the
        context lengths; graphs leave it at `max_model_len`, eager steps give the real maximum."""
        block_tables = self.block_pool.index_select(0, state_idx)
        n = state_idx.shape[0]
        if query_lens is None:
            seq_of_token = torch.arange(n, device=self.device)
            cu = torch.arange(n + 1, device=self.device)
        else:
            seq_of_token = torch.repeat_interleave(
                torch.arange(n, device=self.device), query_lens, output_size=input_ids.shape[0]
            )
            cu = torch.nn.functional.pad(query_lens.cumsum(0), (1, 0))
        blocks = block_tables[seq_of_token, positions // self.block_size].long()
        return StepMetadata(
            input_ids=input_ids, positions=positions, slot_mapping=blocks * self.block_size + positions % self.block_size,
            state_idx=state_idx, block_tables=block_tables, context_lens=context_lens.to(torch.int32),
            cu_seqlens=cu, max_query_len=max_query_len, max_context_len=max_context_len or self.max_model_len,
        )

    # ---- running --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self, work: list[ChunkWork], block_copies: list[tuple[int, int]], state_copies: list[tuple[int, int]]
    ) -> LaunchedStep:
        """Copy blocks and states (in order) as scheduled, run every chunk's new tokens, then draw and
        score what `work` asks for; all of it queued on the device, nothing waited for."""
        chunks = [w.chunk for w in work]
        self.kv.copy_blocks(block_copies)
        self.states.copy_rows(state_copies)
        self._sync_block_tables(chunks)
        fresh = [c.seq.slot for c in chunks if c.start == 0]
        if fresh:
            self.states.zero(self.to_device(fresh))
        if all(c.num_tokens == 1 for c in chunks) and self.graphs is not None and len(chunks) <= self.graphs.max_batch:
            logits = self.graphs.run(chunks, [input_tokens(c)[0] for c in chunks])
            last_rows = list(range(len(chunks)))
            row_of = [[i] if w.logprob_rows else [] for i, w in enumerate(work)]
        else:
            logits, last_rows, row_of = self._packed(work)
        return self._draw(work, logits, last_rows, row_of)

    def _packed(self, work: list[ChunkWork]) -> tuple[torch.Tensor, list[int], list[list[int]]]:
        """Packed forward of every chunk (a chunk graph's replay when one fits, else eager); logits of
        each drawing chunk's last row and of every chunk's log-prob rows only."""
        chunks = [w.chunk for w in work]
        tokens, positions, offsets = [], [], [0]
        for c in chunks:
            tokens += input_tokens(c)
            positions += range(c.start, c.end)
            offsets.append(offsets[-1] + c.num_tokens)
        hidden = None
        if self.chunk_graphs is not None:
            hidden = self._replayed(chunks, tokens, positions, offsets)
        if hidden is None:
            hidden = self._eager(chunks, tokens, positions)
        rows, last_rows, row_of = [], [], []
        for w, start in zip(work, offsets):
            last_rows.append(len(rows))
            if w.draws:  # without draws only log-prob rows: lm-eval's are then every row, in order
                rows.append(start + w.chunk.num_tokens - 1)
            row_of.append([len(rows) + i for i in range(len(w.logprob_rows))])
            rows += [start + r for r in w.logprob_rows]
        return self.model.lm_head(hidden[self.to_device(rows)]), last_rows, row_of

    def _replayed(
        self, chunks: list[ScheduledChunk], tokens: list[int], positions: list[int], offsets: list[int]
    ) -> torch.Tensor | None:
        """Final hidden states of the packed chunks through chunk graphs, or None when they cannot
        take the step. A step whose chunks all fit the recurrent form is one replay. A longer chunk in
        a step of at most the graphs' token count (eagerly such a step is bound by its launches, a
        GDN layer's chunked form alone taking about a millisecond of host time) runs as rounds of
        replays: round r computes every chunk's r-th piece of at most `CHUNK_MAX_LEN` tokens, after
        the pieces before it have written their KV blocks and states."""
        graphs = self.chunk_graphs
        key = graphs.key(len(chunks), len(tokens), max(c.num_tokens for c in chunks))
        if key is not None:
            return graphs.run(key, chunks, tokens, positions)
        if len(tokens) > graphs.max_tokens:
            return None
        rounds: list[list[ScheduledChunk]] = []
        rows: list[list[int]] = []  # packed rows of each round's tokens
        for c, row in zip(chunks, offsets):
            for r, skip in enumerate(range(0, c.num_tokens, CHUNK_MAX_LEN)):
                if r == len(rounds):
                    rounds.append([])
                    rows.append([])
                piece = ScheduledChunk(c.seq, c.start + skip, min(CHUNK_MAX_LEN, c.num_tokens - skip))
                rounds[r].append(piece)
                rows[r] += range(row + skip, row + skip + piece.num_tokens)
        keys = [graphs.key(len(pieces), len(r), max(p.num_tokens for p in pieces)) for pieces, r in zip(rounds, rows)]
        if None in keys:
            return None
        dest = self.to_device([i for r in rows for i in r]).split([len(r) for r in rows])
        hidden = None
        for key, pieces, mine, where in zip(keys, rounds, rows, dest):
            out = graphs.run(key, pieces, [tokens[i] for i in mine], [positions[i] for i in mine])
            if hidden is None:
                hidden = out.new_empty(len(tokens), out.shape[-1])
            hidden.index_copy_(0, where, out)  # before the next replay overwrites the graph's output
        return hidden

    def _eager(self, chunks: list[ScheduledChunk], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Final hidden states `[len(tokens), hidden]` of the packed chunks, run eagerly."""
        return self._run_eager(
            tokens, positions, [c.seq.slot for c in chunks], [c.end for c in chunks], [c.num_tokens for c in chunks]
        )

    def _run_eager(
        self, tokens: list[int], positions: list[int], slots: list[int], ends: list[int], lengths: list[int]
    ) -> torch.Tensor:
        """Final hidden states of packed chunks given per token (ids, positions) and per chunk (state
        slot, context length after it, its length)."""
        n, t = len(slots), len(tokens)
        ids, pos, slot, lens, qlens = self.to_device(tokens + positions + slots + ends + lengths).split([t, t, n, n, n])
        if min(tokens) < 0:  # placeholders of tokens still on the device
            ids = self.resolve_ids(ids)
        meta = self.metadata(ids, pos, slot, lens, qlens, max(lengths), max(ends))
        return self.model.model(ids[None], PagedContext(meta, self.kv, self.states))[0]

    @torch.inference_mode()
    def _warm_up(self, max_num_batched_tokens: int) -> float:
        """Run one eager step of two scratch prompts longer than `CHUNK_MAX_LEN` (on the scratch slot and
        block), so that the chunked linear-attention and prefill kernels that neither graph covers are
        compiled and autotuned now: on a cold Triton cache that took tens of seconds, paid before by the
        first long prompt. Returns the seconds it took."""
        began = time.perf_counter()
        length = min(self.max_model_len, max(2 * CHUNK_MAX_LEN, max_num_batched_tokens // 2))
        self._run_eager([0] * 2 * length, list(range(length)) * 2, [self.pad_slot] * 2, [length] * 2, [length] * 2)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def _draw(
        self, work: list[ChunkWork], logits: torch.Tensor, last_rows: list[int], row_of: list[list[int]]
    ) -> LaunchedStep:
        """Draw the next tokens into `drawn` (each drawing sequence's `input_row` points at its own)
        and queue the copies of tokens and log-probabilities to the host."""
        draw_rows, params, seeds, positions = [], [], [], []
        for w, last in zip(work, last_rows):
            if w.draws:
                w.chunk.seq.input_row = len(draw_rows)
            for p, seed in w.draws:
                draw_rows.append(last)
                params.append(p)
                seeds.append(seed)
                positions.append(w.chunk.seq.num_tokens)
        tokens = None
        if draw_rows:
            drawing = logits[self.to_device(draw_rows)].float()
            if all(p.greedy for p in params):
                drawn = drawing.argmax(-1)
            else:
                fp = torch.tensor([[0.0 if p.greedy else p.temperature, p.top_p] for p in params])
                vocab = logits.shape[-1]  # any top_k past the vocabulary means no filter
                ints = self.to_device([min(p.top_k, vocab) for p in params] + seeds + positions).split(len(params))
                fp = fp.to(self.device, non_blocking=True)
                drawn = sample(drawing, fp[:, 0], ints[0], fp[:, 1], ints[1], ints[2])
            self.drawn[: len(draw_rows)] = drawn
            tokens = self._to_host(drawn)
        scores, top_n = self._score(work, logits, row_of)
        done = None
        if self._pin:
            done = torch.cuda.Event()
            done.record()
        return LaunchedStep(work, tokens, scores, top_n, done)

    def _score(
        self, work: list[ChunkWork], logits: torch.Tensor, row_of: list[list[int]]
    ) -> tuple[Scores | None, list[int]]:
        """Score each chunk's next prompt tokens, then its drawn tokens (read from `drawn`) when it
        scores them; queue the copies to the host. Also each scored row's top-n."""
        rows, targets, top_n, drawn_at = [], [], [], 0
        for w, mine in zip(work, row_of):
            request = w.chunk.seq.request
            if w.prompt_rows:
                rows += mine[: len(w.prompt_rows)]
                targets += [request.prompt_token_ids[w.chunk.start + r + 1] for r in w.prompt_rows]
                top_n += [request.params.prompt_logprobs] * len(w.prompt_rows)
            if w.score_last:
                rows += [mine[-1]] * len(w.draws)
                targets += [-1 - (drawn_at + i) for i in range(len(w.draws))]
                top_n += [request.params.logprobs] * len(w.draws)
            drawn_at += len(w.draws)
        if not rows:
            return None, []
        index, ids = self.to_device(rows + targets).split(len(rows))
        if rows != list(range(logits.shape[0])):  # else every row, in order: no copy of the logits
            logits = logits[index]
        scores = score_tokens(logits, self.resolve_ids(ids), max(top_n))
        return Scores(*(self._to_host(t) for t in scores)), top_n

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor`, asynchronous (pinned) from CUDA."""
        if not self._pin:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def copy_states(self, pairs: list[tuple[int, int]]) -> None:
        self.states.copy_rows(pairs)


def input_tokens(chunk: ScheduledChunk) -> list[int]:
    """A chunk's token ids; a token the host does not know yet (only ever the newest) is named by the
    placeholder `-1 - row` of the draw-buffer row that holds it."""
    ids = chunk.seq.token_ids[chunk.start : chunk.end]
    if len(ids) < chunk.num_tokens:
        ids.append(-1 - chunk.seq.input_row)
    return ids
