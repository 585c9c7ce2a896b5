"""`BlockManager`: allocation of fixed-size KV blocks with reference counts.

A sequence's block table lists the blocks holding its tokens in order. Forked sequences (n > 1)
and prefix-cache hits share blocks; a shared or cached, partly written last block is copied before
it is written (copy on write), so a block indexed by the `PrefixCache` is never written again.
A cached block whose last holder lets go stays cached until the pool needs it (least recently used
first). The manager only does the bookkeeping; the caller copies the block contents.
"""

from __future__ import annotations

import math
from collections import deque

from hyla.runtime.prefix_cache import PrefixCache


class BlockManager:
    """Free list and reference counts of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, cache: PrefixCache | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.cache = cache
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: empty ones and cached ones nobody holds."""
        return len(self._free) + (self.cache.num_idle_blocks if self.cache else 0)

    @property
    def num_used(self) -> int:
        """Blocks someone holds."""
        return self.num_blocks - self.num_free

    def refs(self, block: int) -> int:
        return self._refs[block]

    def blocks_needed(self, table: list[int], num_tokens: int, new_total: int) -> int:
        """New blocks for a sequence holding `num_tokens` tokens to hold `new_total` (copy on write included)."""
        extra = max(0, math.ceil(new_total / self.block_size) - len(table))
        if new_total > num_tokens and self._must_copy_last(table, num_tokens):
            extra += 1
        return extra

    def can_grow(self, table: list[int], num_tokens: int, new_total: int) -> bool:
        return self.blocks_needed(table, num_tokens, new_total) <= self.num_free

    def grow(self, table: list[int], num_tokens: int, new_total: int) -> list[tuple[int, int]]:
        """Extend `table` in place to hold `new_total` tokens; returns (src, dst) block copies to make."""
        if not self.can_grow(table, num_tokens, new_total):
            raise RuntimeError("out of KV blocks")
        copies = []
        if new_total > num_tokens and self._must_copy_last(table, num_tokens):
            new = self._take()
            copies.append((table[-1], new))
            self._release(table[-1])
            table[-1] = new
        while len(table) * self.block_size < new_total:
            table.append(self._take())
        return copies

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of `table` (cached blocks nobody held are taken back)."""
        for block in table:
            if self._refs[block] == 0:
                self.cache.unpark(block)
            self._refs[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` and empty it (last block first, so a cached
        prefix is evicted from its end)."""
        for block in reversed(table):
            self._release(block)
        table.clear()

    def _must_copy_last(self, table: list[int], num_tokens: int) -> bool:
        if not table or num_tokens % self.block_size == 0:
            return False
        last = table[-1]
        return self._refs[last] > 1 or (self.cache is not None and self.cache.is_cached(last))

    def _take(self) -> int:
        block = self._free.popleft() if self._free else self.cache.evict_block()
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self.cache is not None and self.cache.is_cached(block):
                self.cache.park(block)
            else:
                self._free.append(block)
