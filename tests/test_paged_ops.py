"""PyTorch references of the paged attention and state-decode ops against naive dense computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.ops.delta_rule import recurrent_gated_delta_rule
from hyla.runtime.ops.gla import recurrent_gla
from hyla.runtime.ops.paged_attention import paged_decode_attention, paged_prefill_attention
from hyla.runtime.ops.short_conv import short_conv
from hyla.runtime.ops.state_decode import gdn_decode_, gla_decode_, short_conv_decode_

D = 32


def make_pool(
    lens: list[int], Hkv: int, block_size: int, dtype: torch.dtype, gen: torch.Generator, head_dim: int = D,
    table_blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A pool holding each sequence's random K/V in shuffled blocks (plus unused ones), its block table
    (zero-padded to at least ``table_blocks`` entries) and the dense per-sequence K/V ``[len, Hkv, D]``."""
    n_blocks = [math.ceil(n / block_size) for n in lens]
    total = sum(n_blocks) + 2
    perm = torch.randperm(total, generator=gen)
    k_cache = torch.randn(total * block_size, Hkv, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(total * block_size, Hkv, head_dim, generator=gen).to(dtype)
    tables = torch.zeros(len(lens), max(*n_blocks, table_blocks), dtype=torch.int32)
    ks, vs, used = [], [], 0
    for n, (length, nb) in enumerate(zip(lens, n_blocks)):
        tables[n, :nb] = perm[used : used + nb]
        used += nb
        slots = (tables[n, :nb, None].long() * block_size + torch.arange(block_size)).flatten()[:length]
        ks.append(k_cache[slots])
        vs.append(v_cache[slots])
    return k_cache, v_cache, tables, ks, vs


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 attention of queries ``[M, Hq, D]`` at positions ``pos`` over keys ``[L, Hkv, D]`` at 0..L-1."""
    G = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(G, 1) for x in (k, v))
    scores = torch.einsum("mhd,lhd->hml", q.double(), k) * scale
    scores = scores.masked_fill(torch.arange(k.shape[0]) > pos[:, None], float("-inf"))
    return torch.einsum("hml,lhd->mhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)])
def test_decode_reference(Hq: int, Hkv: int, block_size: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(Hq + block_size)
    lens = [1, 0, 37, 64, 100, 0]
    k_cache, v_cache, tables, ks, vs = make_pool(lens, Hkv, block_size, dtype, gen)
    q = torch.randn(len(lens), Hq, D, generator=gen).to(dtype)
    scale = D**-0.5
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, block_size=block_size)
    assert out.dtype == dtype and not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for n, length in enumerate(lens):
        if length == 0:
            assert (out[n] == 0).all()
            continue
        want = dense_attention(q[n : n + 1], ks[n], vs[n], torch.tensor([length - 1]), scale)[0]
        torch.testing.assert_close(out[n].double(), want, atol=tol, rtol=tol)


def test_decode_reference_pool_view_and_bound() -> None:
    """A 4-D pool view, a tighter max_context_len and a caller-provided out give the same result."""
    gen = torch.Generator().manual_seed(1)
    lens = [5, 48, 17]
    k_cache, v_cache, tables, _, _ = make_pool(lens, 2, 16, torch.float32, gen)
    q = torch.randn(3, 4, D, generator=gen)
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.2)
    out = torch.empty_like(q)
    got = paged_decode_attention(
        q, k_cache.view(-1, 16, 2, D), v_cache.view(-1, 16, 2, D), tables, ctx, 0.2, out, max_context_len=48
    )
    assert got is out
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)])
def test_prefill_reference(Hq: int, Hkv: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(Hq)
    block_size = 16
    qlens = [1, 5, 3, 64, 1, 0]
    ctxs = [1, 5, 40, 64, 17, 9]  # fresh prompts, a chunk after a cached prefix, a decode-like row, an idle row
    k_cache, v_cache, tables, ks, vs = make_pool(ctxs, Hkv, block_size, dtype, gen)
    q = torch.randn(sum(qlens), Hq, D, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    scale = 0.3
    out = paged_prefill_attention(
        q, k_cache, v_cache, tables, cu, torch.tensor(ctxs, dtype=torch.int32), scale, max(qlens), block_size=block_size
    )
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for n, (qlen, ctx) in enumerate(zip(qlens, ctxs)):
        lo = int(cu[n])
        pos = torch.arange(ctx - qlen, ctx)
        want = dense_attention(q[lo : lo + qlen], ks[n], vs[n], pos, scale)
        torch.testing.assert_close(out[lo : lo + qlen].double(), want, atol=tol, rtol=tol)


N, H, K, SLOTS, STEPS = 3, 2, 16, 7, 3
IDX = torch.tensor([5, 0, 3])


def untouched(before: torch.Tensor, after: torch.Tensor) -> None:
    others = torch.ones(SLOTS, dtype=torch.bool)
    others[IDX] = False
    assert torch.equal(before[others], after[others])


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gdn_decode_steps_match_recurrence(idx_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k = (F.normalize(rand(N, STEPS, H, K), dim=-1) for _ in range(2))
    v = rand(N, STEPS, H, K)
    g = F.logsigmoid(rand(N, STEPS, H))
    beta = rand(N, STEPS, H).sigmoid()
    pool = rand(SLOTS, H, K, K)
    state = pool.clone()
    outs = [
        gdn_decode_(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, IDX.to(idx_dtype), 0.25) for t in range(STEPS)
    ]
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, pool[IDX])
    torch.testing.assert_close(torch.stack(outs, 1), o_ref)
    torch.testing.assert_close(state[IDX], s_ref)
    untouched(pool, state)


def test_gla_decode_steps_match_recurrence() -> None:
    gen = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = rand(N, STEPS, H, K), rand(N, STEPS, H, K), rand(N, STEPS, H, K)
    gk = F.logsigmoid(rand(N, STEPS, H, K))
    pool = rand(SLOTS, H, K, K)
    state = pool.clone()
    outs = [gla_decode_(q[:, t], k[:, t], v[:, t], gk[:, t], state, IDX, 0.5) for t in range(STEPS)]
    o_ref, s_ref = recurrent_gla(q, k, v, gk, 0.5, pool[IDX])
    torch.testing.assert_close(torch.stack(outs, 1), o_ref)
    torch.testing.assert_close(state[IDX], s_ref)
    untouched(pool, state)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_decode_steps_match_sequence(dtype: torch.dtype, activation: str | None) -> None:
    gen = torch.Generator().manual_seed(2)
    C, W = 12, 4
    x = torch.randn(N, STEPS, C, generator=gen).to(dtype)
    weight = torch.randn(C, W, generator=gen)
    pool = torch.randn(SLOTS, C, W - 1, generator=gen).to(dtype)
    state = pool.clone()
    ys = [short_conv_decode_(x[:, t], weight, state, IDX, activation) for t in range(STEPS)]
    y_ref, s_ref = short_conv(x, weight, conv_state=pool[IDX], activation=activation)
    assert ys[0].dtype == dtype
    torch.testing.assert_close(torch.stack(ys, 1), y_ref)
    torch.testing.assert_close(state[IDX], s_ref)
    untouched(pool, state)
