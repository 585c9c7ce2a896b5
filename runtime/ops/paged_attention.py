"""Softmax attention over a paged KV cache: single-token decode and packed causal prefill.

The KV pool of one layer is ``[num_slots, Hkv, D]`` (or the view ``[num_blocks, block_size, Hkv, D]``)
with token slot ``block * block_size + offset``; ``block_tables [N, max_blocks]`` maps each
sequence's logical blocks to pool blocks and ``context_lens [N]`` counts its cached tokens (the
new ones included). Query head ``i`` uses KV head ``i // G`` (``Hq = G * Hkv``).

CUDA tensors in bf16 / fp16 run Triton kernels (imported on first use); CPU tensors run
:mod:`.cpu_attention`; everything else runs the PyTorch references, which compute in fp32. The
decode path is CUDA-graph safe: its launch grid depends only on shapes and the ``max_context_len``
bound, never on tensor values. So is the Triton prefill (its grid depends on the shapes and
``max_query_len``), but not the prefill reference, which reads the lengths on the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_attention import decode_attention_cpu, prefill_attention_cpu

try:  # Triton ships with CUDA builds only; the references need none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PARTITION_SIZE = 256  # tokens per split-K partition of the decode kernel
_DECODE_TARGET_PROGRAMS = 2048
_DECODE_BLOCK_N = 64
_REDUCE_PARTS = 16  # partitions combined per step of the reduce kernel
_TRITON_DTYPES = (torch.bfloat16, torch.float16)
_TRITON_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    out: Tensor | None = None,
    *,
    max_context_len: int | None = None,
    block_size: int = 16,
    workspace: Tensor | None = None,
) -> Tensor:
    """Attention of one query token per sequence over its cached context.

    q ``[N, Hq, D]``; returns (or fills) ``out [N, Hq, D]`` in q's dtype. ``block_size`` is used
    only for a 3-D pool. ``max_context_len`` is an upper bound on ``context_lens`` (default: what
    the block table can address); with the batch shape it fixes the launch grid. Each sequence's
    context is cut into partitions of ``PARTITION_SIZE`` tokens dealt round-robin to a fixed number
    of splits (:func:`decode_num_splits`), so a loose bound costs only idle splits, never a longer
    loop. Rows with ``context_len == 0`` come out as zeros.
    ``workspace`` (fp32, at least :func:`decode_workspace_numel` elements) holds the partial
    results; when None it is taken from the caching allocator.
    """
    k_cache, v_cache, block_size = _flat_pool(k_cache, v_cache, block_size)
    bound = block_tables.shape[1] * block_size
    max_context_len = bound if max_context_len is None else min(max_context_len, bound)
    if out is None:
        out = torch.empty_like(q)
    if _use_triton(q, k_cache):
        _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out, max_context_len, block_size, workspace)
    elif q.device.type == "cpu":
        out.copy_(decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, block_size))
    else:
        out.copy_(_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, block_size))
    return out


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    scale: float,
    max_query_len: int,
    *,
    block_size: int = 16,
) -> Tensor:
    """Causal attention for packed query chunks whose keys (cached prefix and new tokens) are in the pool.

    q ``[T, Hq, D]`` packs N sequences by ``cu_seqlens_q [N+1]``; query i of sequence n sits at
    position ``context_lens[n] - qlen_n + i`` and attends to keys ``0..position``.
    ``max_query_len`` bounds ``qlen_n`` (it sizes the launch grid). Returns ``[T, Hq, D]`` in q's dtype.
    """
    k_cache, v_cache, block_size = _flat_pool(k_cache, v_cache, block_size)
    if _use_triton(q, k_cache):
        return _prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_query_len, block_size)
    if q.device.type == "cpu":
        return prefill_attention_cpu(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, block_size)
    return _prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, block_size)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int) -> int:
    """Split-K programs per (sequence, KV head): enough for ~``_DECODE_TARGET_PROGRAMS`` in all,
    at most one per partition of the longest possible context."""
    partitions = max(1, math.ceil(max_context_len / PARTITION_SIZE))
    return min(partitions, max(1, math.ceil(_DECODE_TARGET_PROGRAMS / (num_seqs * num_kv_heads))))


def decode_workspace_numel(
    num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, max_context_len: int
) -> int:
    """fp32 elements of the decode workspace: per (sequence, query head, split) max, sum and ``D`` values."""
    return num_seqs * num_q_heads * decode_num_splits(num_seqs, num_kv_heads, max_context_len) * (head_dim + 2)


def _flat_pool(k_cache: Tensor, v_cache: Tensor, block_size: int) -> tuple[Tensor, Tensor, int]:
    """Pool as ``[num_slots, Hkv, D]`` plus its block size (taken from a 4-D view when given one)."""
    if k_cache.dim() == 4:
        block_size = k_cache.shape[1]
        k_cache, v_cache = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return k_cache, v_cache, block_size


def triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether CUDA attention in ``dtype`` over heads of ``head_dim`` runs the Triton kernels."""
    return triton is not None and dtype in _TRITON_DTYPES and head_dim in _TRITON_HEAD_DIMS


def _use_triton(q: Tensor, k_cache: Tensor) -> bool:
    return q.is_cuda and k_cache.dtype == q.dtype and triton_supports(q.dtype, q.shape[-1])


# ----------------------------------------------------------------------------- references


def _gather_context(cache: Tensor, block_tables: Tensor, length: int, block_size: int) -> Tensor:
    """``[N, length, Hkv, D]``: the first ``length`` tokens of every sequence (padding included)."""
    pos = torch.arange(length, device=cache.device)
    blocks = block_tables.long()[:, pos // block_size]
    return cache[blocks * block_size + pos % block_size]


def _decode_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, max_context_len: int, block_size: int,
) -> Tensor:
    """Gather each sequence's first ``max_context_len`` keys/values (in the cache dtype) and run SDPA
    with GQA and a length mask; empty contexts give zeros."""
    N, Hq, D = q.shape
    L = max(min(max_context_len, block_tables.shape[1] * block_size), 1)
    k = _gather_context(k_cache, block_tables, L, block_size).transpose(1, 2)  # [N, Hkv, L, D]
    v = _gather_context(v_cache, block_tables, L, block_size).transpose(1, 2)
    lens = context_lens.to(q.device)
    valid = torch.arange(L, device=q.device) < lens[:, None]  # [N, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None].to(k.dtype), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )[:, :, 0]
    return torch.where((lens > 0)[:, None, None], o, 0.0).to(q.dtype)


def _prefill_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
    context_lens: Tensor, scale: float, block_size: int,
) -> Tensor:
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    for n, ctx in enumerate(context_lens.tolist()):
        lo, hi = cu[n], cu[n + 1]
        if hi == lo:
            continue
        table = block_tables[n : n + 1]
        k = _gather_context(k_cache, table, ctx, block_size)[0].float().transpose(0, 1)  # [Hkv, ctx, D]
        v = _gather_context(v_cache, table, ctx, block_size)[0].float().transpose(0, 1)
        qn = q[lo:hi].float().transpose(0, 1)  # [Hq, qlen, D]
        pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device) <= pos[:, None]
        o = F.scaled_dot_product_attention(qn, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- Triton


def _decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, out: Tensor, max_context_len: int, block_size: int, workspace: Tensor | None,
) -> None:
    N, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    S = decode_num_splits(N, Hkv, max_context_len)
    numel = decode_workspace_numel(N, Hq, Hkv, D, max_context_len)
    if workspace is None:
        workspace = torch.empty(numel, dtype=torch.float32, device=q.device)
    elif workspace.numel() < numel or workspace.dtype != torch.float32:
        raise ValueError(f"workspace must be fp32 with at least {numel} elements")
    part_m = workspace[: N * Hq * S]
    part_l = workspace[N * Hq * S : 2 * N * Hq * S]
    part_acc = workspace[2 * N * Hq * S : numel]
    q, k_cache, v_cache = _last_dim_contiguous(q, k_cache, v_cache)
    _decode_splits_kernel[(N, Hkv, S)](
        q, k_cache, v_cache, block_tables, context_lens, part_m, part_l, part_acc,
        scale * LOG2E, S,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0),
        G=G, G_PAD=max(16, _next_pow2(G)), D=D, BLOCK_SIZE=block_size,
        PART=PARTITION_SIZE, BLOCK_N=_DECODE_BLOCK_N, num_warps=4, num_stages=2,
    )
    _decode_reduce_kernel[(N, Hq)](
        part_m, part_l, part_acc, context_lens, out, S, out.stride(0), out.stride(1), Hq,
        D=D, PART=PARTITION_SIZE, PB=_REDUCE_PARTS, num_warps=4,
    )


PREFILL_CONFIGS = {  # head_dim -> (BLOCK_M rows = query tokens x group heads, BLOCK_N keys, num_warps, num_stages)
    64: (128, 64, 8, 2),
    128: (128, 64, 4, 3),
}


def _prefill_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
    context_lens: Tensor, scale: float, max_query_len: int, block_size: int,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    T, Hq, D = q.shape
    N = cu_seqlens_q.shape[0] - 1
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    block_m, block_n, warps, stages = config or PREFILL_CONFIGS[D]
    q, k_cache, v_cache = _last_dim_contiguous(q, k_cache, v_cache)
    out = torch.empty_like(q)
    grid = (_cdiv(max(max_query_len, 1) * G, block_m), N, Hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        G=G, D=D, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )
    return out


def _last_dim_contiguous(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if triton is not None:

    @triton.jit
    def _decode_splits_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, pm_ptr, pl_ptr, pacc_ptr,
        scale_log2, num_splits,
        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_btn,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        PART: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (sequence, KV head, split): unnormalised output, row max and row sum of its G query heads
        over partitions ``p, p + num_splits, ...`` of the context."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.program_id(2)
        ctx = tl.load(ctx_ptr + n)
        n_valid = (ctx + PART - 1) // PART
        if p >= n_valid:
            return
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_mask = g < G
        q = tl.load(q_ptr + n * stride_qn + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        bt_row = bt_ptr + n.to(tl.int64) * stride_btn
        for part in range(p, n_valid, num_splits):
            for i in range(PART // BLOCK_N):
                t = part * PART + i * BLOCK_N + tl.arange(0, BLOCK_N)
                t_mask = t < ctx
                block = tl.load(bt_row + t // BLOCK_SIZE, mask=t_mask, other=0)
                slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
                k_off = slot[:, None] * stride_kt + h * stride_kh + d[None, :]
                k = tl.load(k_ptr + k_off, mask=t_mask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale_log2
                s = tl.where(t_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                prob = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(prob, 1)
                v_off = slot[:, None] * stride_vt + h * stride_vh + d[None, :]
                v = tl.load(v_ptr + v_off, mask=t_mask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
                m_i = m_new
        row = ((n * (G * tl.num_programs(1)) + h * G + g) * num_splits + p).to(tl.int64)
        tl.store(pm_ptr + row, m_i, mask=g_mask)
        tl.store(pl_ptr + row, l_i, mask=g_mask)
        tl.store(pacc_ptr + row[:, None] * D + d[None, :], acc, mask=g_mask[:, None])

    @triton.jit
    def _decode_reduce_kernel(
        pm_ptr, pl_ptr, pacc_ptr, ctx_ptr, out_ptr, num_splits, stride_on, stride_oh, Hq,
        D: tl.constexpr, PART: tl.constexpr, PB: tl.constexpr,
    ):
        """One (sequence, query head): log-sum-exp merge of its busy splits (zeros when there are none)."""
        n = tl.program_id(0)
        hq = tl.program_id(1)
        ctx = tl.load(ctx_ptr + n)
        n_valid = tl.minimum((ctx + PART - 1) // PART, num_splits)
        base = (n * Hq + hq).to(tl.int64) * num_splits
        d = tl.arange(0, D)
        m_run = tl.full([1], float("-inf"), tl.float32)
        l_run = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for p0 in range(0, n_valid, PB):
            parts = p0 + tl.arange(0, PB)
            p_mask = parts < n_valid
            m = tl.load(pm_ptr + base + parts, mask=p_mask, other=float("-inf"))
            l = tl.load(pl_ptr + base + parts, mask=p_mask, other=0.0)
            a = tl.load(pacc_ptr + (base + parts)[:, None] * D + d[None, :], mask=p_mask[:, None], other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m - m_new)
            l_run = l_run * alpha + tl.sum(l * w, 0)
            acc = acc * alpha + tl.sum(a * w[:, None], 0)
            m_run = m_new
        o = tl.where(l_run > 0, acc / l_run, 0.0)
        tl.store(out_ptr + n * stride_on + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _prefill_tile_kernel(
        acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, s0, pos, pos_hi, scale_log2,
        stride_kt, stride_kh, stride_vt, stride_vh, h,
        D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        """Online-softmax update with keys ``s0 .. s0 + BLOCK_N``; CAUSAL masks keys after each row's position."""
        keys = s0 + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        if CAUSAL:
            k_mask = keys <= pos_hi
            block = tl.load(bt_row + keys // BLOCK_SIZE, mask=k_mask, other=0)
        else:
            block = tl.load(bt_row + keys // BLOCK_SIZE)
        slot = block.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE
        k_off = slot[None, :] * stride_kt + h * stride_kh + d[:, None]
        v_off = slot[:, None] * stride_vt + h * stride_vh + d[None, :]
        if CAUSAL:
            k = tl.load(k_ptr + k_off, mask=k_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptr + k_off)
        s = tl.dot(q, k)
        if CAUSAL:
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s * scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if CAUSAL:
            v = tl.load(v_ptr + v_off, mask=k_mask[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + v_off)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, ctx_ptr, scale_log2,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh, stride_vt, stride_vh, stride_btn,
        G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (row block, sequence, KV head); rows enumerate (query token, head of the KV group) pairs."""
        mb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest row blocks first
        n = tl.program_id(1)
        h = tl.program_id(2)
        q_lo = tl.load(cu_ptr + n)
        qlen = tl.load(cu_ptr + n + 1) - q_lo
        row0 = mb * BLOCK_M
        if row0 >= qlen * G:
            return
        ctx = tl.load(ctx_ptr + n)
        rows = row0 + tl.arange(0, BLOCK_M)
        tok = rows // G
        head = h * G + rows % G
        r_mask = tok < qlen
        pos = ctx - qlen + tok
        d = tl.arange(0, D)
        q_off = (q_lo + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=r_mask[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        bt_row = bt_ptr + n.to(tl.int64) * stride_btn
        pos_lo = ctx - qlen + row0 // G
        pos_hi = tl.minimum(ctx - qlen + (row0 + BLOCK_M - 1) // G, ctx - 1)
        full_end = (pos_lo + 1) // BLOCK_N * BLOCK_N  # keys below are visible to every row
        for s0 in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _prefill_tile_kernel(
                acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, s0, pos, pos_hi, scale_log2,
                stride_kt, stride_kh, stride_vt, stride_vh, h, D, BLOCK_SIZE, BLOCK_N, False,
            )
        for s0 in range(full_end, pos_hi + 1, BLOCK_N):
            acc, l_i, m_i = _prefill_tile_kernel(
                acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, s0, pos, pos_hi, scale_log2,
                stride_kt, stride_kh, stride_vt, stride_vh, h, D, BLOCK_SIZE, BLOCK_N, True,
            )
        o = acc / l_i[:, None]
        o_off = (q_lo + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=r_mask[:, None])
