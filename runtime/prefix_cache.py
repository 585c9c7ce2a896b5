"""`PrefixCache`: the index of reusable cache content — full KV blocks keyed by a hash chain of their
tokens, and snapshot points (a linear-state snapshot and/or a partly filled KV block at one position).

Block `k` of a token sequence is keyed by `hash(key of block k-1, its tokens)`, the chain starting
from a salt naming the model, so equal keys mean equal prefixes. A point at position `p` hangs off
the key of the `p // block_size` full blocks before it, with the `p % block_size` tokens after them
(its tail). Blocks nobody holds and every point are evictable, least recently used first. The index
only does the bookkeeping: reference counts live in the `BlockManager`, rows and tensors elsewhere.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


def chain_hashes(parent: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """Keys of the full blocks of `tokens`, chained from `parent`."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + array("q", tokens[start : start + block_size]).tobytes(),
                                 digest_size=16).digest()
        keys.append(parent)
    return keys


def model_salt(*parts: object) -> bytes:
    """The root of every hash chain: what must match for cached content to be valid (model, dtypes...)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


@dataclass(eq=False)
class Point:
    """Cached content at `position`: the linear states there (state-pool `row`) and, when the position
    ends mid-block, the KV block holding the `tail` tokens after the last full block."""

    key: bytes
    tail: tuple[int, ...]
    position: int
    row: int | None
    block: int | None


class PrefixCache:
    """Hash → block index with an LRU of unreferenced cached blocks, and an LRU index of points."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._tokens_of: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
        """key → (parent key, tokens) of every indexed block."""
        self._next: dict[bytes, list[tuple[int, ...]]] = {}
        """key → the tokens cached right after that prefix (child blocks' tokens and points' tails), sorted."""
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._points: dict[bytes, dict[tuple[int, ...], Point]] = {}
        self._point_lru: OrderedDict[Point, None] = OrderedDict()

    # ---- blocks ---------------------------------------------------------------------------------

    @property
    def num_idle_blocks(self) -> int:
        """Cached blocks no sequence holds (evictable)."""
        return len(self._idle)

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def register(self, block: int, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> None:
        """Index a full, computed block of `tokens` under `key`, the chain key after `parent` (a duplicate
        of cached content stays unindexed)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
            self._tokens_of[key] = (parent, tokens)
            bisect.insort(self._next.setdefault(parent, []), tokens)

    def longest_shared(self, parent: bytes, tokens: tuple[int, ...]) -> int:
        """How many leading `tokens` some cached continuation of the prefix `parent` starts with. In
        sorted order the continuation sharing most with `tokens` lies next to where they would go."""
        ordered = self._next.get(parent, ())
        at = bisect.bisect_left(ordered, tokens)
        return max((common_prefix(ordered[i], tokens) for i in (at - 1, at) if 0 <= i < len(ordered)), default=0)

    def _unlist(self, parent: bytes, tokens: tuple[int, ...]) -> None:
        ordered = self._next[parent]
        del ordered[bisect.bisect_left(ordered, tokens)]
        if not ordered:
            del self._next[parent]

    def match(self, keys: list[bytes]) -> list[int]:
        """Cached blocks of the longest run of leading `keys`."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def park(self, block: int) -> None:
        """A cached block lost its last holder: keep it, most recently used."""
        self._idle[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is held again."""
        del self._idle[block]

    def evict_block(self) -> int:
        """Forget the least recently used parked block and return it for reuse."""
        block, _ = self._idle.popitem(last=False)
        key = self._key_of.pop(block)
        del self._block_of[key]
        parent, tokens = self._tokens_of.pop(key)
        self._unlist(parent, tokens)
        return block

    # ---- points ---------------------------------------------------------------------------------

    @property
    def num_points(self) -> int:
        return len(self._point_lru)

    def points(self) -> list[Point]:
        """Every point, least recently used first."""
        return list(self._point_lru)

    def add_point(self, point: Point) -> None:
        self._points.setdefault(point.key, {})[point.tail] = point
        self._point_lru[point] = None
        bisect.insort(self._next.setdefault(point.key, []), point.tail)

    def find_point(self, key: bytes, tail: tuple[int, ...]) -> Point | None:
        return self._points.get(key, {}).get(tail)

    def points_along(self, key: bytes, tokens: list[int]) -> list[Point]:
        """Points hanging off the full-block prefix `key` whose tails `tokens` start with, shortest first."""
        group = self._points.get(key)
        if not group:
            return []
        if len(group) <= len(tokens):  # few points: test each tail
            return sorted((p for tail, p in group.items() if tokens[: len(tail)] == list(tail)), key=lambda p: len(p.tail))
        found = (group.get(tuple(tokens[:n])) for n in range(len(tokens) + 1))  # many: look each length up
        return [p for p in found if p is not None]

    def touch(self, point: Point) -> None:
        self._point_lru.move_to_end(point)

    def remove_point(self, point: Point) -> None:
        del self._point_lru[point]
        self._unlist(point.key, point.tail)
        group = self._points[point.key]
        del group[point.tail]
        if not group:
            del self._points[point.key]


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (slices compared by bisection: C speed on long prompts)."""
    if type(a) is not type(b):
        a, b = tuple(a), tuple(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
