"""`Scheduler`: continuous batching with chunked prefill, FCFS admission and preemption by recompute.

Each step, running sequences (oldest first) get their next tokens (one for decode, a chunk of the
prompt for prefill) until `max_num_batched_tokens` is used; then waiting sequences are admitted
while a state slot, `max_num_seqs` and KV blocks allow. When KV blocks run out, the newest running
sequences are preempted: their blocks and slot are freed and they wait to be recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hyla.runtime.block_manager import BlockManager
from hyla.runtime.request import Sequence
from hyla.runtime.state_pool import StatePool


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at its position `start`."""

    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owns the waiting and running sequences and their KV blocks and state slots."""

    def __init__(
        self, blocks: BlockManager, states: StatePool, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks, self.states = blocks, states
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence, which already holds its blocks and slot."""
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.order)
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_computed, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.slot is None:  # preempted itself: nothing older is left to run
                break
            self._take(out, seq, n)
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget:
            seq = self.waiting[0]
            need = seq.slots_needed
            reserved = len(self.running) + sum(len(s.spare_slots) for s in self.running)
            if self.states.num_free < need or reserved + need > self.max_num_seqs:
                break
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq.block_table, 0, n):
                break
            self.waiting.pop(0)
            seq.slot = self.states.allocate()
            seq.spare_slots = [self.states.allocate() for _ in range(need - 1)]
            self.running.append(seq)
            self._take(out, seq, n)
            budget -= n
        return out

    def _take(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        out.block_copies += self.blocks.grow(seq.block_table, seq.num_computed, seq.num_computed + n)
        out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))

    def _preempt(self, seq: Sequence) -> None:
        """Free everything `seq` holds; it is recomputed from its tokens when readmitted."""
        self._release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        at = next((j for j, w in enumerate(self.waiting) if w.order > seq.order), len(self.waiting))
        self.waiting.insert(at, seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        for slot in ([seq.slot] if seq.slot is not None else []) + seq.spare_slots:
            self.states.free(slot)
        seq.slot, seq.spare_slots = None, []

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence: free its cache and forget it."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
