"""Packed varlen causal short conv on CUDA: one Triton pass over the tokens.

The PyTorch path of :func:`.short_conv.short_conv` builds a padded buffer and W fp32 gathers of
the whole ``[tokens, C]`` input, which for a long prefill costs gigabytes of traffic and
temporaries. Here each token reads its W-1 predecessors straight from x, or from the carried conv
state where they fall before the sequence start, and writes its output once. The new states (the
last W-1 inputs of each sequence) are a small gather. Same numerics as the reference: fp32
products in tap order, state values rounded to x's dtype first.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds only
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_T, BLOCK_C = 32, 128


def varlen_short_conv(
    x: Tensor, weight: Tensor, conv_state: Tensor | None, cu_seqlens: Tensor, silu: bool
) -> tuple[Tensor, Tensor]:
    """``x`` ``[total, C]`` (rows may be strided), ``weight`` ``[C, W]``, ``conv_state`` ``[N, C, W-1]``
    or None (zeros), ``cu_seqlens`` ``[N+1]`` on x's device. Returns y ``[total, C]`` and the new
    state ``[N, C, W-1]``, both in x's dtype."""
    total, C = x.shape
    W = weight.shape[1]
    cu = cu_seqlens.to(x.device, torch.long)
    seq = torch.searchsorted(cu[1:], torch.arange(total, device=x.device), right=True)
    start = cu[seq]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(total, C, dtype=x.dtype, device=x.device)
    state = conv_state if conv_state is not None else x.new_zeros(1, 1, 1)
    if total:
        _varlen_conv_kernel[(triton.cdiv(total, BLOCK_T), triton.cdiv(C, BLOCK_C))](
            x, weight, state, seq, start, y, total, C, x.stride(0), weight.stride(0), weight.stride(1),
            state.stride(0), state.stride(1), state.stride(2),
            W=W, BT=BLOCK_T, BC=BLOCK_C, HAS_STATE=conv_state is not None, SILU=silu, num_warps=4,
        )
    return y, _last_inputs(x, conv_state, cu, W)


def _last_inputs(x: Tensor, conv_state: Tensor | None, cu: Tensor, W: int) -> Tensor:
    """Each sequence's last W-1 inputs ``[N, C, W-1]``, from its old state where it is shorter."""
    N, C = cu.numel() - 1, x.shape[1]
    pos = cu[1:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
    inside = pos >= cu[:-1, None]
    tail = x[pos.clamp_min(0)].transpose(1, 2)  # [N, C, W-1]
    if conv_state is None:
        return torch.where(inside[:, None, :], tail, torch.zeros((), dtype=x.dtype, device=x.device)).contiguous()
    at = (pos - cu[:-1, None] + (W - 1)).clamp(0, W - 2)
    old = conv_state.to(x.dtype).gather(2, at[:, None, :].expand(N, C, W - 1))
    return torch.where(inside[:, None, :], tail, old).contiguous()


if triton is not None:

    @triton.jit
    def _varlen_conv_kernel(
        x_ptr, w_ptr, s_ptr, seq_ptr, start_ptr, y_ptr, T, C, stride_x, stride_wc, stride_ww,
        stride_sn, stride_sc, stride_sw,
        W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    ):
        """One (token block, channel block): y = act(sum_j w[:, j] * input[t - (W-1-j)])."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        t_mask = t < T
        c_mask = c < C
        mask = t_mask[:, None] & c_mask[None, :]
        start = tl.load(start_ptr + t, mask=t_mask, other=0)
        acc = tl.zeros([BT, BC], tl.float32)
        for j in tl.static_range(W):
            p = t - (W - 1 - j)
            inside = p >= start
            val = tl.load(x_ptr + p.to(tl.int64)[:, None] * stride_x + c[None, :], mask=mask & inside[:, None], other=0.0)
            if HAS_STATE:
                seq = tl.load(seq_ptr + t, mask=t_mask, other=0).to(tl.int64)
                at = p - start + (W - 1)
                past = tl.load(
                    s_ptr + seq[:, None] * stride_sn + c[None, :] * stride_sc + at[:, None] * stride_sw,
                    mask=mask & (~inside)[:, None], other=0.0,
                ).to(val.dtype)
                val = tl.where(inside[:, None], val, past)
            acc += val.to(tl.float32) * tl.load(w_ptr + c * stride_wc + j * stride_ww, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + t.to(tl.int64)[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
