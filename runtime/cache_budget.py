"""Splitting one memory budget between paged KV blocks (softmax layers) and state slots (linear layers).

The KV pool grows with context length, the state pool with concurrency; their sizes come from the
model's real shapes (`cache_sizes`), and the KV block size is independent of the state size. A
budget that cannot hold what was asked for never fails start-up: concurrency, and if need be the
context length, is clamped, and the plan says so. With prefix caching, part of the KV share buys
state-pool rows for linear-state snapshots: one per checkpoint interval of tokens the KV pool holds,
at most half of that share, never below one full-length sequence's blocks. Cached blocks themselves
need no budget: they are KV blocks nobody holds, evicted when a sequence needs them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

from hyla.runtime.info import CacheSizes

REPORT_LENGTHS = (1024, 4096, 8192)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "m": 2**20, "g": 2**30}


def free_device_memory(device: str) -> int:
    """Bytes free on a CUDA device, or available system memory for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_memory(spec: str | int | float, device: str = "cpu") -> int:
    """`"2GiB"`, `"512MiB"`, `"1000000"` -> bytes; a unitless number in (0, 1] is a fraction of free memory."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(spec))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {spec!r}; use e.g. '2GiB', '512MiB', '1000000' or a fraction '0.5'")
    value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {spec!r}")
    if not unit and value <= 1:
        return int(value * free_device_memory(device))
    return int(value * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def max_concurrent(sizes: CacheSizes, budget: int, tokens: int, block_size: int) -> int:
    """Sequences of `tokens` tokens that fit in `budget` bytes (KV rounded up to whole blocks)."""
    per_seq = math.ceil(tokens / block_size) * block_size * sizes.kv_bytes_per_token + sizes.state_bytes_per_sequence
    return budget // per_seq if per_seq else 0


@dataclass(frozen=True)
class CachePlan:
    """How many KV blocks and state slots a budget buys, and what had to be clamped."""

    budget_bytes: int
    block_size: int
    num_blocks: int
    num_slots: int
    max_model_len: int
    kv_bytes_per_block: int
    state_bytes_per_slot: int
    notes: list[str] = field(default_factory=list)
    num_snapshot_rows: int = 0
    """State-pool rows beyond `num_slots` for prefix-cache snapshots (running sequences may use them too)."""
    checkpoint_interval: int | None = None
    """Prefix caching's snapshot interval in tokens, None when prefix caching is off."""

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def state_bytes(self) -> int:
        """Slots and snapshot rows."""
        return (self.num_slots + self.num_snapshot_rows) * self.state_bytes_per_slot

    def max_sequences(self, tokens: int) -> int:
        """Sequences of `tokens` tokens that can run at once (slots and KV blocks both limit)."""
        if self.kv_bytes_per_block == 0:
            return self.num_slots
        return min(self.num_slots, self.num_blocks // math.ceil(tokens / self.block_size))

    def report(self, lengths: tuple[int, ...] = REPORT_LENGTHS) -> str:
        """Start-up text: pools, sequences that fit at given lengths, clamps."""
        snapshots = f" + {self.num_snapshot_rows} snapshot rows" if self.num_snapshot_rows else ""
        if self.checkpoint_interval is None:
            caching = "prefix caching off"
        else:
            caching = ("prefix caching on: idle KV blocks stay cached"
                       + (f", linear states kept every {self.checkpoint_interval} prompt tokens and at prompt ends"
                          if self.state_bytes_per_slot else ""))
        lines = [
            f"cache budget {fmt_bytes(self.budget_bytes)}: {self.num_blocks} KV blocks of {self.block_size} tokens "
            f"({fmt_bytes(self.kv_bytes)}) + {self.num_slots} linear-state slots{snapshots} "
            f"({fmt_bytes(self.state_bytes)})",
            caching,
            "sequences that fit at once: " + ", ".join(
                f"{n} tokens: {self.max_sequences(n)}"
                for n in sorted({*lengths, self.max_model_len}) if n <= self.max_model_len
            ) + f" (max_model_len {self.max_model_len})",
        ]
        return "\n".join(lines + self.notes)


def plan_cache(
    sizes: CacheSizes, budget: int, block_size: int, max_num_seqs: int, max_model_len: int,
    checkpoint_interval: int | None = None,
) -> CachePlan:
    """Give every one of `max_num_seqs` sequences a state slot and the rest of the budget to KV blocks
    (and, with prefix caching every `checkpoint_interval` tokens, to snapshot rows).

    The KV pool must hold at least one sequence of `max_model_len` tokens; if that and the slots do not
    fit, the slot count is clamped, then the context length, never below one slot and one block.
    """
    plan = _plan_pools(sizes, budget, block_size, max_num_seqs, max_model_len)
    if checkpoint_interval is None:
        return plan
    return replace(plan, checkpoint_interval=checkpoint_interval,
                   **_snapshot_split(plan, checkpoint_interval, sizes.kv_bytes_per_token))


def _snapshot_split(plan: CachePlan, interval: int, kv_per_token: int) -> dict[str, int]:
    """Blocks and snapshot rows when part of the KV share buys snapshots (kv-less models: as many as slots
    if the budget holds them)."""
    state = plan.state_bytes_per_slot
    if not state:
        return {}
    if not kv_per_token:
        return {"num_snapshot_rows": min(plan.num_slots, max(0, plan.budget_bytes // state - plan.num_slots))}
    kv_share = plan.num_blocks * plan.kv_bytes_per_block
    blocks = int(kv_share // (plan.kv_bytes_per_block + plan.block_size * state / interval))
    rows = min(blocks * plan.block_size // interval, kv_share // 2 // state)
    min_blocks = math.ceil(plan.max_model_len / plan.block_size)
    rows = max(0, min(rows, (kv_share - min_blocks * plan.kv_bytes_per_block) // state))
    return {"num_blocks": (kv_share - rows * state) // plan.kv_bytes_per_block, "num_snapshot_rows": rows}


def _plan_pools(
    sizes: CacheSizes, budget: int, block_size: int, max_num_seqs: int, max_model_len: int
) -> CachePlan:
    kv_block = sizes.kv_bytes_per_token * block_size
    state = sizes.state_bytes_per_sequence
    notes: list[str] = []
    if kv_block == 0:  # no softmax layers: blocks cost nothing, only slots count
        slots = max(1, min(max_num_seqs, budget // state)) if state else max_num_seqs
        if slots < max_num_seqs:
            notes.append(f"note: max_num_seqs clamped from {max_num_seqs} to {slots}: the budget holds "
                         f"{slots} linear-state slots of {fmt_bytes(state)}")
        blocks = slots * math.ceil(max_model_len / block_size)
        return CachePlan(budget, block_size, blocks, slots, max_model_len, 0, state, notes)

    blocks_per_seq = math.ceil(max_model_len / block_size)
    if budget < blocks_per_seq * kv_block + state:
        fit_blocks = max(1, (budget - state) // kv_block) if budget > state else 1
        new_len = max(2, min(max_model_len, fit_blocks * block_size))
        notes.append(f"note: max_model_len clamped from {max_model_len} to {new_len}: the budget "
                     f"{fmt_bytes(budget)} holds no longer sequence")
        max_model_len, blocks_per_seq = new_len, math.ceil(new_len / block_size)
    spare = budget - blocks_per_seq * kv_block
    slots = max(1, min(max_num_seqs, spare // state)) if state else max_num_seqs
    if slots < max_num_seqs:
        notes.append(f"note: max_num_seqs clamped from {max_num_seqs} to {slots}: {slots} linear-state slots "
                     f"of {fmt_bytes(state)} plus one {max_model_len}-token sequence's KV fill the budget")
    blocks = max(blocks_per_seq, (budget - slots * state) // kv_block)
    if blocks * kv_block + slots * state > budget:
        notes.append(f"note: the budget {fmt_bytes(budget)} is below one sequence's need; "
                     f"using {fmt_bytes(blocks * kv_block + slots * state)}")
    return CachePlan(budget, block_size, blocks, slots, max_model_len, kv_block, state, notes)
