"""Causal depthwise short convolution with a carried conv state (PyTorch on any device; packed
batches on CUDA run the Triton pass of :mod:`.short_conv_cuda`, dense ones in CUDA training fla's
fused conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fla_modules


def short_conv(
    x: Tensor,
    weight: Tensor,
    *,
    conv_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv: ``y_t = act(sum_j weight[:, j] * x_{t-W+1+j})``.

    x is ``[B, T, C]``, or ``[1, total, C]`` packed with ``cu_seqlens`` (N+1 offsets); weight is
    ``[C, W]``. ``conv_state`` ``[N, C, W-1]`` holds the W-1 inputs before each sequence (zeros when
    None). Returns y (x's shape and dtype) and the new state ``[N, C, W-1]`` in x's dtype: the last
    W-1 inputs of each sequence, reaching into the old state for sequences shorter than W-1.
    Computed in fp32 without host syncs; a packed batch on the CPU runs one conv in x's dtype
    (fp32 accumulation), on CUDA one Triton pass (:mod:`.short_conv_cuda`).
    """
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    B, T, C = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        return _dense(x, weight, conv_state, activation)
    if B != 1:
        raise ValueError(f"batch size must be 1 with cu_seqlens, got {B}")
    if x.is_cuda:
        from .short_conv_cuda import varlen_short_conv

        y, new_state = varlen_short_conv(x[0], weight, conv_state, cu_seqlens, activation == "silu")
        return y[None], new_state
    dev = x.device
    cu = cu_seqlens.to(dev, torch.long)
    N, total = cu.numel() - 1, x.shape[1]
    if conv_state is None:
        conv_state = x.new_zeros(N, C, W - 1)

    # Buffer holding, for each sequence in turn, its W-1 state inputs followed by its tokens.
    seq = torch.searchsorted(cu[1:], torch.arange(total, device=dev), right=True)
    tok_pos = torch.arange(total, device=dev) + (seq + 1) * (W - 1)
    lag = torch.arange(W - 1, device=dev)
    seq_off = torch.arange(N, device=dev)[:, None] * (W - 1)
    buf = x.new_empty(total + N * (W - 1), C)
    buf[tok_pos] = x[0]
    buf[cu[:-1, None] + seq_off + lag] = conv_state.to(x.dtype).transpose(1, 2)

    if dev.type == "cpu":  # one depthwise conv over the whole buffer; windows never cross sequences
        y = F.conv1d(buf.t()[None], weight.to(x.dtype)[:, None, :], groups=C)[0].t()[tok_pos - (W - 1)]
    else:
        w = weight.float()
        y = sum(buf[tok_pos - (W - 1 - j)].float() * w[:, j] for j in range(W))
    if activation == "silu":
        y = F.silu(y)
    new_state = buf[cu[1:, None] + seq_off + lag].transpose(1, 2).contiguous()
    return y.to(x.dtype)[None], new_state


def _dense(x: Tensor, weight: Tensor, conv_state: Tensor | None, activation: str | None) -> tuple[Tensor, Tensor]:
    """Dense batch ``[B, T, C]``: one grouped conv1d over the state followed by the tokens."""
    B, T, C = x.shape
    W = weight.shape[1]
    if conv_state is None and T > 0 and fla_modules.applies(x):  # training on CUDA: fla's fused conv
        tail = torch.cat([x.new_zeros(B, W - 1, C), x[:, -(W - 1) :]], 1)[:, -(W - 1) :]
        return fla_modules.short_conv(x, weight, activation), tail.transpose(1, 2).contiguous()
    if conv_state is None:
        conv_state = x.new_zeros(B, C, W - 1)
    xin = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], -1)  # [B, C, W-1+T]
    if T == 0:
        return x, xin.contiguous()
    y = F.conv1d(xin.float(), weight.float()[:, None, :], groups=C).transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), xin[..., T:].contiguous()
