"""KV block allocation (refcounts, copy on write), state slots, and splitting the memory budget."""

from __future__ import annotations

import pytest
import torch

from hyla.runtime.block_manager import BlockManager
from hyla.runtime.cache_budget import max_concurrent, parse_memory, plan_cache
from hyla.runtime.cache_manager import CacheManager
from hyla.runtime.config import HybridConfig
from hyla.runtime.info import CacheSizes, cache_sizes
from hyla.runtime.state_pool import StatePool


def test_blocks_grow_fork_copy_on_write_and_free() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    table: list[int] = []
    assert bm.blocks_needed(table, 0, 10) == 3
    assert bm.grow(table, 0, 10) == [] and len(table) == 3 and bm.num_free == 3
    child = bm.fork(table)
    assert child == table and bm.num_free == 3
    # appending to the shared, half-full last block copies it first
    assert bm.blocks_needed(child, 10, 11) == 1
    copies = bm.grow(child, 10, 11)
    assert copies == [(table[-1], child[-1])] and child[:2] == table[:2] and child[-1] != table[-1]
    assert bm.grow(table, 10, 12) == []  # the parent's last block is no longer shared
    bm.free(child)
    assert bm.num_free == 3 - 1 + 1  # only the child's private block came back
    bm.free(table)
    assert bm.num_free == 6 and bm.num_used == 0
    big: list[int] = []
    assert not bm.can_grow(big, 0, 25)
    with pytest.raises(RuntimeError):
        bm.grow(big, 0, 25)
    assert big == [] and bm.num_free == 6


def test_full_shared_blocks_are_not_copied() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.grow(table, 0, 8)
    child = bm.fork(table)
    assert bm.grow(child, 8, 9) == [] and child[:2] == table[:2] and len(child) == 3


def tiny_hybrid_config() -> HybridConfig:
    return HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, layer_types=["gdn", "attention", "gla"])


def test_state_pool_zeroes_copies_and_stores_by_slot() -> None:
    pool = StatePool(tiny_hybrid_config(), num_slots=3, dtype=torch.float32, state_dtype=torch.bfloat16, device="cpu")
    assert pool.recurrent.dtype == torch.bfloat16 and pool.recurrent.shape[:2] == (2, 3)
    slots = torch.tensor([0])
    conv, rec = pool.load(0, slots)
    pool.store(0, slots, torch.ones_like(conv), torch.ones_like(rec))
    pool.store(2, slots, torch.ones_like(conv), torch.ones_like(rec))
    pool.copy(0, 1)
    assert bool((pool.recurrent[:, 1] == 1).all()) and bool((pool.conv[:, 1] == 1).all())
    pool.zero(torch.tensor([0]))
    assert not pool.recurrent[:, 0].any() and not pool.conv[:, 0].any()
    assert bool((pool.recurrent[:, 1] == 1).all()) and not pool.recurrent[:, 2].any()
    conv_view, rec_view = pool.layer(2)
    assert rec_view.data_ptr() == pool.recurrent[1].data_ptr() and conv_view.shape == pool.conv.shape[1:]


@pytest.mark.parametrize("seed", range(4))
def test_state_pool_copy_rows_matches_copies_one_by_one(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pools = [StatePool(tiny_hybrid_config(), num_slots=12, dtype=torch.float32, state_dtype=torch.float32, device="cpu")
             for _ in range(2)]
    for pool in pools:
        torch.manual_seed(seed)
        pool.conv.copy_(torch.randn(pool.conv.shape))
        pool.recurrent.copy_(torch.randn(pool.recurrent.shape))
    rows = torch.randperm(12, generator=g).tolist()
    pairs = list(zip(rows[:5], rows[5:10]))  # disjoint: one gather and one scatter
    if seed % 2:
        pairs.append((pairs[0][1], rows[10]))  # a chain: must see the earlier copy
    pools[0].copy_rows(pairs)
    for src, dst in pairs:
        pools[1].copy(src, dst)
    assert torch.equal(pools[0].conv, pools[1].conv) and torch.equal(pools[0].recurrent, pools[1].recurrent)


def test_cache_manager_admits_forks_and_releases() -> None:
    from hyla.runtime.request import Request, Sequence
    from hyla.runtime.sampling_params import SamplingParams

    cache = CacheManager(num_blocks=8, block_size=4, num_slots=3)
    request = Request("r", None, list(range(6)), SamplingParams(n=2, max_tokens=4), 0)
    parent = Sequence(request, 0, list(range(6)), None)
    request.seqs.append(parent)
    assert cache.can_admit(parent, 6)
    assert cache.admit(parent, 6) == [] and len(parent.block_table) == 2
    assert parent.slot is not None and len(parent.spare_slots) == 1 and cache.num_free_slots == 1
    parent.num_computed = 6
    parent.token_ids.append(9)
    child = Sequence(request, 1, list(parent.token_ids), None, num_computed=6)
    cache.fork(parent, child)
    assert child.block_table == parent.block_table and child.slot not in (parent.slot, None)
    parent.synced_blocks = child.synced_blocks = 2
    copies = cache.grow(child, 7)  # appends into the shared half-full block: copy on write
    assert len(copies) == 1 and child.synced_blocks == 1 and child.block_table[-1] != parent.block_table[-1]
    big = Sequence(request, 2, list(range(40)), None)
    assert not cache.can_admit(big, 40)
    cache.release(child)
    cache.release(parent)
    assert cache.num_free_slots == 3 and cache.blocks.num_used == 0 and parent.slot is None


def test_prefill_chunks_end_at_checkpoints_not_just_after_their_start() -> None:
    from hyla.runtime.prefix_cache import PrefixCache
    from hyla.runtime.request import Request, Sequence
    from hyla.runtime.sampling_params import SamplingParams

    cache = CacheManager(num_blocks=64, block_size=4, num_slots=2, prefix_cache=PrefixCache(b"m"), has_state=True,
                         checkpoint_interval=32, num_snapshot_rows=4)
    request = Request("r", None, list(range(100)), SamplingParams(max_tokens=1), 0)
    seq = Sequence(request, 0, list(range(100)), None)
    assert cache.chunk_size(seq, 0, 1000) == 32  # the first checkpoint
    assert cache.chunk_size(seq, 20, 1000) == 12  # a quarter interval (8) or more before one: it ends there
    assert cache.chunk_size(seq, 26, 1000) == 38  # closer (a hit just before it): on to the next one, 64
    assert cache.chunk_size(seq, 90, 1000) == 10  # the end of the prompt
    assert cache.chunk_size(seq, 0, 5) == 5  # the step's token budget


def test_parse_memory() -> None:
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1000000") == 1_000_000
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert 0 < parse_memory("0.01") < parse_memory("0.02")
    for bad in ("lots", "-1GiB", "2 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_plan_splits_by_real_needs_and_clamps() -> None:
    sizes = CacheSizes(kv_bytes_per_token=100, state_bytes_per_sequence=10_000)
    plan = plan_cache(sizes, budget=1_000_000, block_size=16, max_num_seqs=8, max_model_len=1024)
    assert plan.num_slots == 8 and plan.state_bytes == 80_000
    assert plan.num_blocks == (1_000_000 - 80_000) // 1600 and plan.kv_bytes + plan.state_bytes <= 1_000_000
    assert plan.max_sequences(1024) == min(8, plan.num_blocks // 64)
    assert not plan.notes
    # too many sequences for the budget: slots clamp, start-up goes on
    small = plan_cache(sizes, budget=300_000, block_size=16, max_num_seqs=64, max_model_len=1024)
    assert small.num_slots == (300_000 - 64 * 1600) // 10_000 and "max_num_seqs" in small.report()
    # not even one full-length sequence fits: the context length clamps too
    tiny = plan_cache(sizes, budget=50_000, block_size=16, max_num_seqs=4, max_model_len=4096)
    assert tiny.max_model_len < 4096 and tiny.num_slots >= 1 and tiny.num_blocks >= 1
    assert "max_model_len" in tiny.report()
    # no linear layers: every byte goes to KV; no softmax layers: blocks are free
    assert plan_cache(CacheSizes(100, 0), 1_000_000, 16, 8, 1024).num_blocks == 1_000_000 // 1600
    assert plan_cache(CacheSizes(0, 10_000), 50_000, 16, 8, 1024).num_slots == 5


def test_hybrid_fits_more_sequences_than_teacher() -> None:
    teacher = HybridConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=8,
                           num_attention_heads=9, num_key_value_heads=3)
    hybrid = HybridConfig(**{**teacher.to_dict(), "layer_types": ["attention", "gdn", "gdn", "gdn"] * 2})
    budget = 2 * 2**30
    for tokens in (1024, 4096, 8192):
        t = max_concurrent(cache_sizes(teacher, torch.float32), budget, tokens, 16)
        h = max_concurrent(cache_sizes(hybrid, torch.float32), budget, tokens, 16)
        assert h > t > 0
