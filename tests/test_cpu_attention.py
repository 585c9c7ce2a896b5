"""The CPU paged attention against the fp32 PyTorch references of `paged_attention` on fresh random pools."""

from __future__ import annotations

import pytest
import torch

from hyla.runtime.ops import paged_attention as pa
from hyla.runtime.ops import cpu_kernels
from hyla.runtime.ops.cpu_attention import (
    decode_attention_cpu, decode_attention_sdpa, gather_blocks, prefill_attention_cpu, prefill_attention_sdpa,
)
from tests.test_paged_ops import make_pool

D = 64


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def test_gather_blocks_matches_token_gather() -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache, _, tables, ks, _ = make_pool([40, 16, 3], 2, 16, torch.bfloat16, gen, D)
    got = gather_blocks(k_cache, tables, tables.shape[1], 16)
    assert got.shape == (3, 2, tables.shape[1] * 16, D)
    for n, k in enumerate(ks):
        assert torch.equal(got[n, :, : len(k)], k.transpose(0, 1))
    buffer = torch.full((got.numel() + 7,), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(gather_blocks(k_cache, tables, tables.shape[1], 16, buffer), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3)])
@pytest.mark.parametrize("lens", [[300], [7, 0, 130, 64, 129], [50, 50, 50], [700, 1, 257]])
@pytest.mark.parametrize("impl", ["dispatch", "sdpa"])
def test_decode_matches_reference(impl: str, lens: list[int], Hq: int, Hkv: int, dtype: torch.dtype) -> None:
    """The C++ kernel (what `decode_attention_cpu` runs here) and its SDPA fallback; contexts of
    several kernel partitions, in blocks scattered over the pool."""
    if impl == "dispatch":
        assert cpu_kernels.available(), "the CPU kernels must build on a machine with a compiler"
    fn = decode_attention_cpu if impl == "dispatch" else decode_attention_sdpa
    gen = torch.Generator().manual_seed(len(lens) + Hq)
    block_size = 16
    k_cache, v_cache, tables, _, _ = make_pool(lens, Hkv, block_size, dtype, gen, D, table_blocks=48)
    q = torch.randn(len(lens), Hq, D, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    bound = max(lens) + 5
    got = fn(q, k_cache, v_cache, tables, ctx, 0.125, bound, block_size)
    want = pa._decode_reference(q, k_cache, v_cache, tables, ctx, 0.125, bound, block_size)
    assert got.dtype == dtype and got.shape == q.shape
    tol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert (got[ctx == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 40])
def test_decode_kernel_other_head_widths_and_a_strided_query(head_dim: int, dtype: torch.dtype) -> None:
    """Head widths off the bf16 fast path (40) and on it (128); q a view into a wider qkv row."""
    assert cpu_kernels.available()
    gen = torch.Generator().manual_seed(head_dim)
    lens, Hq, Hkv = [33, 290], 8, 2
    k_cache, v_cache, tables, _, _ = make_pool(lens, Hkv, 16, dtype, gen, head_dim, table_blocks=24)
    qkv = torch.randn(len(lens), (Hq + 2 * Hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : Hq * head_dim].view(len(lens), Hq, head_dim)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, tables, ctx, head_dim**-0.5, 16)
    want = pa._decode_reference(q, k_cache, v_cache, tables, ctx, head_dim**-0.5, max(lens), 16)
    tol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3)])
@pytest.mark.parametrize("impl", ["dispatch", "sdpa"])
@pytest.mark.parametrize("head_dim", [D, 128])
def test_prefill_matches_reference(head_dim: int, impl: str, Hq: int, Hkv: int, dtype: torch.dtype) -> None:
    """Fresh prompts (two of one length), chunks after a cached prefix, an idle row, a context of
    several hundred tokens (in bf16 `prefill_attention_cpu` runs the C++ kernel here)."""
    if impl == "dispatch" and dtype == torch.bfloat16:
        assert cpu_kernels.available()
    fn = prefill_attention_cpu if impl == "dispatch" else prefill_attention_sdpa
    gen = torch.Generator().manual_seed(Hq)
    block_size = 16
    qlens = [37, 5, 37, 0, 16, 1, 300]
    ctxs = [37, 70, 37, 9, 48, 20, 333]
    k_cache, v_cache, tables, _, _ = make_pool(ctxs, Hkv, block_size, dtype, gen, head_dim)
    q = torch.randn(sum(qlens), Hq, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctxs, dtype=torch.int32)
    got = fn(q, k_cache, v_cache, tables, cu, ctx, 0.2, block_size)
    want = pa._prefill_reference(q, k_cache, v_cache, tables, cu, ctx, 0.2, block_size)
    assert got.dtype == dtype and got.shape == q.shape
    tol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_paged_entry_points_use_cpu_path() -> None:
    gen = torch.Generator().manual_seed(3)
    lens = [33, 18]
    k_cache, v_cache, tables, _, _ = make_pool(lens, 2, 16, torch.bfloat16, gen, D)
    q = torch.randn(2, 6, D, generator=gen).to(torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = pa.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.3, max_context_len=33, block_size=16)
    assert torch.equal(got, decode_attention_cpu(q, k_cache, v_cache, tables, ctx, 0.3, 33, 16))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    got = pa.paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.3, 1, block_size=16)
    assert torch.equal(got, prefill_attention_cpu(q, k_cache, v_cache, tables, cu, ctx, 0.3, 16))
