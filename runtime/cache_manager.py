"""`CacheManager`: the one owner of cache bookkeeping — KV blocks of softmax layers, state-pool rows
of linear layers, and the prefix cache — for every sequence (lookup / admit / grow / fork / release).

It hands out indices only; the tensors they index (`PagedKVCache`, `StatePool`) belong to the model
runner. State-pool rows serve two uses: a running sequence's state slot (which also names its row in
the runner's device block-table pool, so `Sequence.synced_blocks` tells the runner how much of that
row is already on the device), and the snapshots of the prefix cache. Cached content (blocks nobody
holds, snapshot points) is evicted, least recently used first, whenever a sequence needs the room.

Prefix caching: full computed blocks are indexed by the hash chain of their tokens. A point is taken
where the state there is known: every `checkpoint_interval` prompt tokens (but for one that a
chunk would reach within a quarter interval of its start) and at the end of the prompt (linear
states copied to a snapshot row; the chunked prefill ends there), where a prompt stops agreeing
with tokens cached before or with the requests waiting behind it (so others sharing a system prompt
of any length resume from its very end), and when a sequence finishes (prompt + answer, for the
next turn of a chat). A model without linear layers needs points only where a position ends
mid-block (they keep that partial block), and keeps one after any chunk that passed it: no chunk
ends there for it, so the request sharing a prefix still takes one step. A hit is the longest prefix
whose blocks and, for linear layers, state exist at the same position, capped so that at least one
token is computed: an exact repeat of a prompt resumes from the last checkpoint before its end.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from hyla.runtime.block_manager import BlockManager
from hyla.runtime.prefix_cache import PrefixCache, Point, chain_hashes, common_prefix
from hyla.runtime.request import Sequence


@dataclass
class Hit:
    """Where a sequence can start: `position` tokens already in `blocks` (and the state of `point`)."""

    position: int = 0
    blocks: list[int] = field(default_factory=list)
    point: Point | None = None


class CacheManager:
    """KV blocks (reference counted, copy on write), state rows and the prefix cache."""

    def __init__(
        self, num_blocks: int, block_size: int, num_slots: int, *, prefix_cache: PrefixCache | None = None,
        has_state: bool = False, checkpoint_interval: int = 0, num_snapshot_rows: int = 0,
    ) -> None:
        self.cache = prefix_cache
        self.blocks = BlockManager(num_blocks, block_size, prefix_cache)
        self.block_size = block_size
        self.num_slots = num_slots
        self.num_rows = num_slots + num_snapshot_rows
        self.has_state = has_state
        self.checkpoint_interval = checkpoint_interval
        self._free_rows = list(range(self.num_rows - 1, -1, -1))
        self._point_rows = 0
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ---- accounting -----------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        """Rows a sequence could take: free ones and those of evictable snapshots."""
        return len(self._free_rows) + self._point_rows

    @property
    def num_used_slots(self) -> int:
        """Rows running sequences hold."""
        return self.num_rows - len(self._free_rows) - self._point_rows

    @property
    def num_snapshots(self) -> int:
        return self._point_rows

    @property
    def num_cached_blocks(self) -> int:
        """Blocks only the prefix cache holds (evictable)."""
        idle = self.cache.num_idle_blocks if self.cache is not None else 0
        return idle + self._point_only_blocks()

    @property
    def num_used_blocks(self) -> int:
        """Blocks running sequences hold."""
        return self.blocks.num_used - self._point_only_blocks()

    def _point_only_blocks(self, exclude: Point | None = None) -> int:
        return len(self._point_held(exclude)) if self.cache is not None else 0

    def _point_held(self, exclude: Point | None = None) -> set[int]:
        """Blocks that points alone hold (one block may be kept by several points of one prompt)."""
        held = Counter(p.block for p in self.cache.points() if p.block is not None and p is not exclude)
        return {block for block, n in held.items() if self.blocks.refs(block) == n}

    # ---- lookup and admission -------------------------------------------------------------------

    def lookup(self, seq: Sequence, peers: Iterable[Sequence] = ()) -> Hit:
        """The longest cached prefix `seq` can start from (nothing is taken yet); sets where past it
        `seq` should keep a point: where its prompt stops agreeing with cached tokens or with the
        prompts of `peers` (requests waiting behind it, which can then start from there)."""
        request = seq.request
        limit = seq.num_tokens - 1
        if request.prompt_logprobs is not None:  # positions whose log-probabilities are still missing
            limit = min(limit, len(request.prompt_logprobs) - 1)
        if self.cache is None or limit <= 0:
            return Hit()
        bs = self.block_size
        keys = self._keys(seq, seq.num_tokens // bs)
        matched = self.cache.match(keys)
        best = Hit()
        if not self.has_state:
            position = min(len(matched) * bs, limit)
            best = Hit(position, matched[: math.ceil(position / bs)])
        for k in range(min(len(matched), limit // bs), -1, -1):
            if best.position >= (k + 1) * bs:
                break
            mine = seq.token_ids[k * bs : min((k + 1) * bs - 1, limit)]
            for point in self.cache.points_along(keys[k - 1] if k else self.cache.salt, mine):
                position = k * bs + len(point.tail)
                if best.position < position and (point.row is not None or not self.has_state):
                    best = Hit(position, matched[:k] + ([point.block] if point.tail else []), point)
        shared = self._shared_length(seq, keys, len(matched), limit)
        for peer in peers:
            if peer.request is not seq.request:
                shared = max(shared, min(common_prefix(seq.token_ids, peer.token_ids), limit))
        # linear layers: the point ends a chunk (a step more for `seq`), worth it past a block;
        # KV only: any chunk passing it leaves the KV before it final
        seq.keep_at = shared if shared > max(best.position, self.block_size if self.has_state else 0) else 0
        return best

    def _shared_length(self, seq: Sequence, keys: list[bytes], full: int, limit: int) -> int:
        """`full` matched blocks, then the longest run of the next block's tokens that some cached
        continuation of them starts with (at most `limit`)."""
        bs = self.block_size
        mine = tuple(seq.token_ids[full * bs : (full + 1) * bs])
        common = self.cache.longest_shared(keys[full - 1] if full else self.cache.salt, mine)
        return min(full * bs + common, limit)

    def can_admit(self, seq: Sequence, num_tokens: int, hit: Hit | None = None) -> bool:
        """Whether `seq` can take its slots (the whole family before a fork) and blocks to compute
        `num_tokens` tokens after `hit`."""
        hit = hit or Hit()
        if self.num_free_slots < seq.slots_needed:
            return False
        bs = self.block_size
        need = max(0, math.ceil((hit.position + num_tokens) / bs) - len(hit.blocks))
        need += 1 if hit.position % bs else 0  # the shared last block is copied before it is written
        revived = sum(1 for b in hit.blocks if self.cache.is_idle(b)) if self.cache else 0
        free = self.blocks.num_free - revived
        return need <= free or need <= free + self._point_only_blocks(exclude=hit.point)

    def admit(self, seq: Sequence, num_tokens: int, hit: Hit | None = None) -> list[tuple[int, int]]:
        """Start a waiting sequence at `hit` (its blocks shared, `num_computed` set): its slot, its
        siblings' spare slots and blocks for `num_tokens` more tokens; returns block copies. The
        caller copies the hit's snapshot into the slot."""
        hit = hit or Hit()
        seq.block_table = self.blocks.fork(hit.blocks)
        seq.num_computed = hit.position
        seq.registered_blocks = 0
        if hit.point is not None:
            self.cache.touch(hit.point)
        if self.cache is not None and seq.request.num_cached_tokens is None:
            seq.request.num_cached_tokens = min(hit.position, seq.request.num_prompt_tokens)
            self.queried_tokens += seq.request.num_prompt_tokens
            self.hit_tokens += seq.request.num_cached_tokens
        seq.slot = self._take_row()
        seq.spare_slots = [self._take_row() for _ in range(seq.slots_needed - 1)]
        seq.synced_blocks = 0
        return self.grow(seq, hit.position + num_tokens)

    # ---- running sequences ----------------------------------------------------------------------

    def chunk_size(self, seq: Sequence, start: int, num_tokens: int) -> int:
        """At most `num_tokens` of `seq` from `start`, ending at the end of the prompt and, for linear
        layers, at checkpoints, so the states there can be kept (one less than a quarter interval
        past `start`, e.g. just after a prefix hit, is passed over for the next)."""
        prompt_len = seq.request.num_prompt_tokens
        if self.cache is None or start >= prompt_len:
            return num_tokens
        end = prompt_len
        if self.has_state and self.checkpoint_interval:
            interval = self.checkpoint_interval
            checkpoint = (start // interval + 1) * interval
            if checkpoint - start < interval // 4:  # so close to the start that a step costs more than it saves
                checkpoint += interval
            end = min(end, checkpoint)
        if self.has_state and seq.keep_at > start:
            end = min(end, seq.keep_at)
        return min(num_tokens, end - start)

    def can_grow(self, seq: Sequence, new_total: int) -> bool:
        """Whether blocks for `new_total` tokens can be found (evicting cached content if need be)."""
        need = self.blocks.blocks_needed(seq.block_table, seq.num_computed, new_total)
        return need <= self.blocks.num_free or need <= self.blocks.num_free + self._point_only_blocks()

    def grow(self, seq: Sequence, new_total: int) -> list[tuple[int, int]]:
        """Blocks for `seq` to hold `new_total` tokens; returns (src, dst) block copies (copy on write)."""
        need = self.blocks.blocks_needed(seq.block_table, seq.num_computed, new_total)
        while need > self.blocks.num_free:  # evicting a point frees its block once no other holds it
            held = self._point_held()
            self._evict(next(p for p in self.cache.points() if p.block in held))
        copies = self.blocks.grow(seq.block_table, seq.num_computed, new_total)
        if copies:  # the last entry was replaced: the device row must be rewritten from there
            seq.synced_blocks = min(seq.synced_blocks, len(seq.block_table) - 1)
        return copies

    def computed(self, seq: Sequence, finished: bool = False) -> list[tuple[int, int]]:
        """After a chunk of `seq` ran: index its newly full blocks and keep a point where one is due
        (a checkpoint, the end of the prompt, or a finished sequence). Returns the (slot, row) state
        copies to make now."""
        if self.cache is None:
            return []
        bs, done = self.block_size, seq.num_computed
        known = min(done, len(seq.token_ids))  # a queued step may compute a token not known here yet
        keys = self._keys(seq, known // bs)
        for j in range(seq.registered_blocks, known // bs):
            parent = keys[j - 1] if j else self.cache.salt
            self.cache.register(seq.block_table[j], keys[j], parent, tuple(seq.token_ids[j * bs : (j + 1) * bs]))
        seq.registered_blocks = known // bs
        if known < done:
            return []
        if not self.has_state and 0 < seq.keep_at <= done:  # a chunk passed it: the KV before it is final
            if seq.keep_at % bs:
                self._keep_point(seq, seq.keep_at)
            seq.keep_at = 0
        prompt_len = seq.request.num_prompt_tokens
        due = finished or done in (prompt_len, seq.keep_at) or (
            done < prompt_len and self.checkpoint_interval and done % self.checkpoint_interval == 0)
        if not due or not (self.has_state or done % bs):
            return []
        return self._keep_point(seq, done)

    def _keep_point(self, seq: Sequence, done: int) -> list[tuple[int, int]]:
        """Keep a point at `done` (the states there are `seq`'s current ones when it has any)."""
        bs = self.block_size
        k = done // bs
        key = seq.block_keys[k - 1] if k else self.cache.salt
        tail = tuple(seq.token_ids[k * bs : done])
        existing = self.cache.find_point(key, tail)
        if existing is not None:
            self.cache.touch(existing)
            return []
        row = None
        if self.has_state:
            if not self._free_rows and not self._point_rows:
                return []
            row = self._take_row()
            self._point_rows += 1
        block = None
        if tail:
            block = seq.block_table[k]
            self.blocks.fork([block])
        self.cache.add_point(Point(key, tail, done, row, block))
        return [] if row is None else [(seq.slot, row)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares `parent`'s blocks and takes one of its spare slots (states copied by the caller)."""
        child.block_table = self.blocks.fork(parent.block_table)
        child.block_keys = list(parent.block_keys)
        child.registered_blocks = parent.registered_blocks
        child.slot = parent.spare_slots.pop()
        child.synced_blocks = 0

    def release(self, seq: Sequence) -> None:
        """Free everything `seq` holds (its cached blocks stay cached)."""
        self.blocks.free(seq.block_table)
        self._free_rows += ([seq.slot] if seq.slot is not None else []) + seq.spare_slots
        seq.slot, seq.spare_slots, seq.synced_blocks = None, [], 0

    # ---- internals ------------------------------------------------------------------------------

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hash-chain keys of the first `num_blocks` full blocks of `seq` (extended as it grows)."""
        have = len(seq.block_keys)
        if have < num_blocks:
            bs = self.block_size
            parent = seq.block_keys[-1] if have else self.cache.salt
            seq.block_keys += chain_hashes(parent, seq.token_ids[have * bs : num_blocks * bs], bs)
        return seq.block_keys

    def _take_row(self) -> int:
        if not self._free_rows:
            self._evict(next(p for p in self.cache.points() if p.row is not None))
        return self._free_rows.pop()

    def _evict(self, point: Point) -> None:
        self.cache.remove_point(point)
        if point.row is not None:
            self._free_rows.append(point.row)
            self._point_rows -= 1
        if point.block is not None:
            self.blocks.free([point.block])

