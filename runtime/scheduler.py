"""`Scheduler`: continuous batching with chunked prefill, FCFS admission and preemption by recompute.

Each step, running sequences (oldest first) get their next tokens (one for decode, a chunk of the
prompt for prefill) until `max_num_batched_tokens` is used; then waiting sequences are admitted
while a state slot, `max_num_seqs` and KV blocks allow, each starting after the longest prefix the
prefix cache holds for it (its snapshot copied into its slot). A prompt sharing a prefix with
requests waiting behind it keeps a point where they diverge, and they wait a step or more for it
rather than compute the prefix again. Prefill chunks end where the cache manager keeps snapshots.
When KV blocks run out, the newest running sequences are preempted: their blocks and slot are freed
and they wait to be recomputed. The scheduler owns the `CacheManager`, so every cache change goes
through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hyla.runtime.cache_manager import CacheManager
from hyla.runtime.request import Sequence


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at its position `start`."""

    seq: Sequence
    start: int
    num_tokens: int
    completes: bool = field(init=False)
    """After this chunk every token the sequence had when scheduled is computed: its last position
    predicts the next token."""

    def __post_init__(self) -> None:
        self.completes = self.end == self.seq.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    state_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) state-pool rows to copy, in order, before the step runs (prefix-cache hits)."""
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """Every chunk is one new token of a sequence past its prompt."""
        return all(c.num_tokens == 1 and c.start >= c.seq.request.num_prompt_tokens for c in self.chunks)


PEER_WINDOW = 8
"""Waiting requests a newly admitted prompt compares itself with: the prefix it shares with any of
them is kept as a point, and they wait for it (lm-eval's endings of one context, a burst of chats
with one system prompt)."""


class Scheduler:
    """Owns the waiting and running sequences and, through its `CacheManager`, their cache."""

    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child`, a sibling of `parent` whose prompt is done, on `parent`'s blocks and a spare slot."""
        self.cache.fork(parent, child)
        self.running.append(child)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.order)
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
            if seq.final_pending:  # its last token is still on the device: nothing left to run
                i += 1
                continue
            n = self.cache.chunk_size(seq, seq.num_computed, min(seq.num_uncomputed, budget))
            while not self.cache.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.slot is None:  # preempted itself: nothing older is left to run
                break
            out.block_copies += self.cache.grow(seq, seq.num_computed + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        j = 0
        leaders = [r for r in self.running if self._leads(r)]
        reserved = len(self.running) + sum(len(s.spare_slots) for s in self.running)  # slots held
        while j < len(self.waiting) and budget:
            seq = self.waiting[j]
            if leaders and self._awaits_leader(seq, leaders):
                j += 1
                continue
            hit = self.cache.lookup(seq, self.waiting[j + 1 : j + 1 + PEER_WINDOW])
            n = self.cache.chunk_size(seq, hit.position, min(seq.num_tokens - hit.position, budget))
            if reserved + seq.slots_needed > self.max_num_seqs or not self.cache.can_admit(seq, n, hit):
                break
            self.waiting.pop(j)
            reserved += seq.slots_needed
            out.block_copies += self.cache.admit(seq, n, hit)
            if hit.point is not None and hit.point.row is not None:
                out.state_copies.append((hit.point.row, seq.slot))
            self.running.append(seq)
            if self._leads(seq):
                leaders.append(seq)
            out.chunks.append(ScheduledChunk(seq, hit.position, n))
            budget -= n
        return out

    def _leads(self, seq: Sequence) -> bool:
        """Whether requests waiting behind `seq` and sharing its prompt should start from the point it
        is yet to keep (past half a block: a shorter prefix is not worth a step's wait)."""
        return seq.keep_at > max(seq.num_computed, self.cache.block_size // 2)

    @staticmethod
    def _awaits_leader(seq: Sequence, leaders: list[Sequence]) -> bool:
        """Whether one of `leaders` (running prompts yet to reach their `keep_at`) is computing a prefix
        `seq` shares and will keep a point at its end: `seq` then waits for that point instead of
        computing the prefix again."""
        for leader in leaders:
            at = leader.keep_at
            if (leader.request is not seq.request and len(seq.token_ids) > at
                    and seq.token_ids[:at] == leader.token_ids[:at]):
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        """Free everything `seq` holds; it is recomputed from its tokens when readmitted."""
        self.cache.release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        at = next((j for j, w in enumerate(self.waiting) if w.order > seq.order), len(self.waiting))
        self.waiting.insert(at, seq)
        self.num_preemptions += 1

    def park(self, seq: Sequence) -> None:
        """Stop scheduling `seq` but keep its cache until `remove` (a step still in flight uses it)."""
        self.running.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished, aborted or failed sequence: free its cache and forget it."""
        self.cache.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
