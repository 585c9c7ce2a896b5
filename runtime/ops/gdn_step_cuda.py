"""One Gated DeltaNet decode step as one Triton kernel, from the input projections to the gated norm.

Unfused, a GDN layer's decode step after its stacked input projection runs the short conv, two
L2 norms, the gates, the recurrent update and the gated RMSNorm: six kernels of a few
microseconds, in a step that is bound by kernel count. Here one program per (sequence, head) does
all of it on the head's channels, reading and writing the conv and recurrent state slots in place.
It follows the unfused ops' roundings (conv output, normalised q/k, o and the norm in the
activation dtype), so the two agree to bf16 rounding; the tests hold it to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds only
    import triton
    import triton.language as tl
except ImportError:
    triton = None

L2_EPS = 1e-6
"""As :func:`hyla.runtime.layers.gated_deltanet.l2_normalize`."""


def fused_gdn_step_(
    qkv: Tensor, gate: Tensor, a: Tensor, b: Tensor, conv_weight: Tensor, conv_state: Tensor,
    state: Tensor, state_idx: Tensor, a_log: Tensor, dt_bias: Tensor, norm_weight: Tensor, norm_eps: float,
    scale: float,
) -> Tensor:
    """qkv ``[N, 3·H·D]``, gate ``[N, H·D]``, a and b ``[N, H]`` (rows may be strided views of one
    projection); conv_weight ``[3·H·D, W]``, conv_state ``[slots, 3·H·D, W-1]``, state fp32
    ``[slots, H, D, D]``, both updated in place at ``state_idx``. Returns
    ``RMSNorm(o)·SiLU(gate)`` ``[N, H·D]`` in qkv's dtype."""
    N = qkv.shape[0]
    H = a.shape[1]
    D = gate.shape[1] // H
    W = conv_weight.shape[1]
    if state.stride(-1) != 1 or state.stride(-2) != D:
        raise ValueError("state must have contiguous [D, D] matrices")
    for x in (qkv, gate, a, b):
        if x.stride(1) != 1:
            raise ValueError("projection rows must be contiguous")
    out = torch.empty(N, H * D, dtype=qkv.dtype, device=qkv.device)
    _gdn_step_kernel[(N, H)](
        qkv, gate, a, b, conv_weight, conv_state, state, state_idx, a_log, dt_bias, norm_weight, out,
        qkv.stride(0), gate.stride(0), a.stride(0), b.stride(0), conv_weight.stride(0), conv_weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), state.stride(0), state.stride(1),
        scale, norm_eps, L2_EPS, H, D=D, W=W, WP=triton.next_power_of_2(W - 1), num_warps=4 if D <= 64 else 8,
    )
    return out


if triton is not None:

    @triton.jit
    def _conv_window(x_row, w_ptr, s_ptrs, ch, stride_wc, stride_ww, stride_sw, W: tl.constexpr, WP: tl.constexpr):
        """SiLU(causal conv) of one input over the channels `ch` (fp32, rounded to x's dtype), and the
        state window shifted by that input, to be stored once every thread has read the old one."""
        x = tl.load(x_row + ch)
        j = tl.arange(0, WP)[None, :]
        past = tl.load(s_ptrs, mask=j < W - 1, other=0.0)
        later = tl.load(s_ptrs + stride_sw, mask=j < W - 2, other=0.0)
        w = tl.load(w_ptr + ch[:, None] * stride_wc + j * stride_ww, mask=j < W - 1, other=0.0)
        w_last = tl.load(w_ptr + ch * stride_wc + (W - 1) * stride_ww).to(x.dtype).to(tl.float32)
        acc = tl.sum(past.to(x.dtype).to(tl.float32) * w.to(x.dtype).to(tl.float32), 1) + w_last * x.to(tl.float32)
        window = tl.where(j == W - 2, x[:, None].to(later.dtype), later)
        return (acc * tl.sigmoid(acc)).to(x.dtype), window

    @triton.jit
    def _l2_normalize(x, eps):
        xf = x.to(tl.float32)
        return (x * (1.0 / tl.sqrt(tl.sum(xf * xf, 0) + eps)).to(x.dtype)).to(tl.float32)

    @triton.jit
    def _gdn_step_kernel(
        qkv_ptr, gate_ptr, a_ptr, b_ptr, w_ptr, cs_ptr, s_ptr, idx_ptr, alog_ptr, dtb_ptr, nw_ptr, out_ptr,
        stride_qkv, stride_gate, stride_a, stride_b, stride_wc, stride_ww, stride_cn, stride_cc, stride_cw,
        stride_sn, stride_sh, scale, eps, l2_eps, H,
        D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    ):
        n = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, D)
        slot = tl.load(idx_ptr + n).to(tl.int64)
        x_row = qkv_ptr + n * stride_qkv
        j = tl.arange(0, WP)[None, :]
        cs_q = cs_ptr + slot * stride_cn + (h * D + d)[:, None] * stride_cc + j * stride_cw
        cs_k = cs_q + H * D * stride_cc
        cs_v = cs_k + H * D * stride_cc
        q, win_q = _conv_window(x_row, w_ptr, cs_q, h * D + d, stride_wc, stride_ww, stride_cw, W, WP)
        k, win_k = _conv_window(x_row, w_ptr, cs_k, (H + h) * D + d, stride_wc, stride_ww, stride_cw, W, WP)
        v, win_v = _conv_window(x_row, w_ptr, cs_v, (2 * H + h) * D + d, stride_wc, stride_ww, stride_cw, W, WP)
        tl.debug_barrier()  # threads holding copies of one channel must all have read the old window
        tl.store(cs_q, win_q, mask=j < W - 1)
        tl.store(cs_k, win_k, mask=j < W - 1)
        tl.store(cs_v, win_v, mask=j < W - 1)
        q = _l2_normalize(q, l2_eps)
        k = _l2_normalize(k, l2_eps)
        a = tl.load(a_ptr + n * stride_a + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
        g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus
        beta = tl.sigmoid(tl.load(b_ptr + n * stride_b + h).to(tl.float32))
        s_ptrs = s_ptr + slot * stride_sn + h * stride_sh + d[:, None] * D + d[None, :]
        S = tl.load(s_ptrs).to(tl.float32) * tl.exp(g)
        u = beta * (v.to(tl.float32) - tl.sum(S * k[:, None], 0))
        S = S + k[:, None] * u[None, :]
        tl.store(s_ptrs, S)
        o = (scale * tl.sum(S * q[:, None], 0)).to(out_ptr.dtype.element_ty).to(tl.float32)
        normed = (o * (1.0 / tl.sqrt(tl.sum(o * o, 0) / D + eps))).to(out_ptr.dtype.element_ty)
        normed = (tl.load(nw_ptr + d) * normed).to(out_ptr.dtype.element_ty)
        gate = tl.load(gate_ptr + n * stride_gate + h * D + d).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + n * H * D + h * D + d, normed * silu)
