"""`CacheManager`: the one owner of cache bookkeeping — KV blocks of softmax layers and state slots of
linear layers — for every sequence (admit / grow / fork / release).

It hands out indices only; the tensors they index (`PagedKVCache`, `StatePool`) belong to the model
runner. A sequence's state slot also names its row in the runner's device block-table pool, so
`Sequence.synced_blocks` tells the runner how much of that row is already on the device.
"""

from __future__ import annotations

from hyla.runtime.block_manager import BlockManager
from hyla.runtime.request import Sequence


class CacheManager:
    """KV blocks (reference counted, copy on write) and state slots of running sequences."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.num_slots = num_slots
        self._free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can take its slots (the whole family before a fork) and blocks for `num_tokens`."""
        return (self.num_free_slots >= seq.slots_needed
                and self.blocks.can_grow(seq.block_table, 0, num_tokens))

    def admit(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Give a waiting sequence its slot, its siblings' spare slots and blocks for `num_tokens`."""
        seq.slot = self._free_slots.pop()
        seq.spare_slots = [self._free_slots.pop() for _ in range(seq.slots_needed - 1)]
        seq.synced_blocks = 0
        return self.grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, new_total: int) -> bool:
        return self.blocks.can_grow(seq.block_table, seq.num_computed, new_total)

    def grow(self, seq: Sequence, new_total: int) -> list[tuple[int, int]]:
        """Blocks for `seq` to hold `new_total` tokens; returns (src, dst) block copies (copy on write)."""
        copies = self.blocks.grow(seq.block_table, seq.num_computed, new_total)
        if copies:  # the last entry was replaced: the device row must be rewritten from there
            seq.synced_blocks = min(seq.synced_blocks, len(seq.block_table) - 1)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares `parent`'s blocks and takes one of its spare slots (states copied by the caller)."""
        child.block_table = self.blocks.fork(parent.block_table)
        child.slot = parent.spare_slots.pop()
        child.synced_blocks = 0

    def release(self, seq: Sequence) -> None:
        """Free everything `seq` holds."""
        self.blocks.free(seq.block_table)
        self._free_slots += ([seq.slot] if seq.slot is not None else []) + seq.spare_slots
        seq.slot, seq.spare_slots, seq.synced_blocks = None, [], 0
