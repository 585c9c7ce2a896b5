"""`BlockManager`: allocation of fixed-size KV blocks with reference counts.

A sequence's block table lists the blocks holding its tokens in order. Forked sequences (n > 1)
share their parent's blocks; a shared, partly filled last block is copied before it is written
(copy on write). The manager only does the bookkeeping; the caller copies the block contents.
"""

from __future__ import annotations

import math
from collections import deque


class BlockManager:
    """Free list and reference counts of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int, new_total: int) -> int:
        """New blocks for a sequence holding `num_tokens` tokens to hold `new_total` (copy on write included)."""
        extra = max(0, math.ceil(new_total / self.block_size) - len(table))
        if new_total > num_tokens and self._must_copy_last(table, num_tokens):
            extra += 1
        return extra

    def can_grow(self, table: list[int], num_tokens: int, new_total: int) -> bool:
        return self.blocks_needed(table, num_tokens, new_total) <= len(self._free)

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
        """A new table sharing every block of `table`."""
        for block in table:
            self._refs[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` and empty it."""
        for block in table:
            self._release(block)
        table.clear()

    def _must_copy_last(self, table: list[int], num_tokens: int) -> bool:
        return bool(table) and num_tokens % self.block_size != 0 and self._refs[table[-1]] > 1

    def _take(self) -> int:
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)
