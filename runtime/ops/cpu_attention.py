"""Paged softmax attention on the CPU: each sequence's keys/values gathered block by block in the
cache dtype, then PyTorch's fused CPU attention (fp32 softmax, no fp32 copy of the context).

Decode folds the ``G = Hq / Hkv`` query heads of a KV head into the query length of one
``[N, Hkv, G, D]`` attention, so every KV head is read once for its whole group and no key is
repeated. Prefill runs one batched causal attention per distinct (query length, context length)
of the chunks — a single call for a batch of equal prompts. Layouts are those of
:mod:`.paged_attention`, whose PyTorch references these functions are tested against.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels


_scratch = threading.local()


def gather_blocks(
    cache: Tensor, block_tables: Tensor, num_blocks: int, block_size: int, out: Tensor | None = None
) -> Tensor:
    """``[N, Hkv, num_blocks * block_size, D]`` view of the first ``num_blocks`` blocks of every
    table row of a ``[num_slots, Hkv, D]`` pool: one copy of whole blocks, into the front of the
    flat buffer ``out`` when given."""
    N = block_tables.shape[0]
    _, Hkv, D = cache.shape
    width = block_size * Hkv * D  # a 2-D gather of whole blocks is several times faster than a 4-D one
    index = block_tables[:, :num_blocks].flatten().long()
    dest = None if out is None else out[: index.numel() * width].view(-1, width)
    blocks = torch.index_select(cache.view(-1, width), 0, index, out=dest)
    return blocks.view(N, num_blocks * block_size, Hkv, D).transpose(1, 2)


def _scratch_buffers(numel: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two flat buffers of at least ``numel`` elements, kept by this thread for its decode gathers
    (a fresh multi-megabyte tensor every layer would pay its page faults each time)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None or bufs[0].dtype != dtype or bufs[0].numel() < numel:
        bufs = _scratch.bufs = (torch.empty(numel, dtype=dtype), torch.empty(numel, dtype=dtype))
    return bufs


def _decode_mask(context_lens: Tensor, length: int, dtype: torch.dtype) -> tuple[bool, Tensor | None]:
    """(whether some context is empty, the additive padding mask `[N, 1, 1, length]` or None); made
    once for the lengths every layer of a step shares."""
    key = (tuple(context_lens.tolist()), length, dtype)
    memo = getattr(_scratch, "mask", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    mask = None
    if min(key[0]) < length:  # an additive mask runs faster than a boolean one
        pad = torch.arange(length) >= context_lens[:, None].long()
        mask = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, float("-inf"))[:, None, None]
    _scratch.mask = (key, (min(key[0]) == 0, mask))
    return _scratch.mask[1]


def decode_attention_cpu(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, max_context_len: int, block_size: int,
) -> Tensor:
    """One query per sequence: q ``[N, Hq, D]`` -> ``[N, Hq, D]`` in q's dtype; empty contexts give zeros.
    The C++ kernel reads the pool in place; the gather and SDPA below are its fallback and reference."""
    if cpu_kernels.usable(q, k_cache, v_cache) and block_tables.dtype == context_lens.dtype == torch.int32:
        return cpu_kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)
    return decode_attention_sdpa(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, block_size)


def decode_attention_sdpa(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, max_context_len: int, block_size: int,
) -> Tensor:
    """`decode_attention_cpu` as a block gather and PyTorch's fused attention."""
    N, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    num_blocks = min(max(1, math.ceil(max_context_len / block_size)), block_tables.shape[1])
    length = num_blocks * block_size
    k_buf, v_buf = _scratch_buffers(N * length * Hkv * D, k_cache.dtype)
    k = gather_blocks(k_cache, block_tables, num_blocks, block_size, k_buf)
    v = gather_blocks(v_cache, block_tables, num_blocks, block_size, v_buf)
    empty, mask = _decode_mask(context_lens, length, k.dtype)
    o = F.scaled_dot_product_attention(q.view(N, Hkv, Hq // Hkv, D).to(k.dtype), k, v, attn_mask=mask, scale=scale)
    o = o.reshape(N, Hq, D).to(q.dtype)
    if empty:
        o = torch.where((context_lens > 0)[:, None, None], o, 0.0)
    return o


def prefill_attention_cpu(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
    context_lens: Tensor, scale: float, block_size: int,
) -> Tensor:
    """Causal attention of packed chunks q ``[T, Hq, D]`` (chunk n's queries are the last ``qlen_n``
    of its ``context_lens[n]`` positions) -> ``[T, Hq, D]`` in q's dtype. bf16 runs the C++ kernel
    where the CPU has AVX512-BF16; the gather and SDPA below are its fallback and reference."""
    if cpu_kernels.prefill_supported(q) and k_cache.dtype == q.dtype:
        return cpu_kernels.prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                             block_size)
    return prefill_attention_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, block_size)


def prefill_attention_sdpa(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
    context_lens: Tensor, scale: float, block_size: int,
) -> Tensor:
    """`prefill_attention_cpu` as block gathers and PyTorch's fused attention."""
    cu = cu_seqlens_q.tolist()
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for n, ctx in enumerate(context_lens.tolist()):
        if cu[n + 1] > cu[n]:
            groups[cu[n + 1] - cu[n], ctx].append(n)
    out = torch.zeros_like(q)
    for (qlen, ctx), seqs in groups.items():
        rows = torch.tensor([cu[n] + i for n in seqs for i in range(qlen)])
        num_blocks = math.ceil(ctx / block_size)
        tables = block_tables[seqs]
        k = gather_blocks(k_cache, tables, num_blocks, block_size)[:, :, :ctx]
        v = gather_blocks(v_cache, tables, num_blocks, block_size)[:, :, :ctx]
        qs = q[rows].view(len(seqs), qlen, *q.shape[1:]).transpose(1, 2).to(k.dtype)
        if qlen == ctx:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.arange(ctx) <= torch.arange(ctx - qlen, ctx)[:, None]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = o.transpose(1, 2).reshape(-1, *q.shape[1:]).to(q.dtype)
    return out
