"""Single-token steps of the linear-attention layers, updating pooled per-sequence states in place.

Sequence n reads and writes state slot ``state_idx[n]`` (indices distinct; other slots are left
alone). Recurrent states are fp32 ``[slots, H, K, V]``; conv states ``[slots, C, W-1]`` hold the
previous W-1 inputs, oldest first. CUDA tensors run Triton kernels (imported on first use); CPU
tensors run the step as a few batched products; other devices run the PyTorch recurrences of
:mod:`.delta_rule`, :mod:`.gla` and :mod:`.short_conv`, which the tests hold the fast paths to.
All paths are CUDA-graph safe: no host syncs, grids fixed by shapes.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton ships with CUDA builds only; the references need none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .delta_rule import recurrent_gated_delta_rule
from .gla import recurrent_gla
from .short_conv import short_conv


def gdn_decode_(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, state_idx: Tensor, scale: float
) -> Tensor:
    """Gated DeltaNet step: per head ``S = exp(g) S; S += k (beta (v - S^T k))^T; o = scale S^T q``.

    q, k ``[N, H, K]`` (L2-normalised), v ``[N, H, V]``, g (log-decay) and beta ``[N, H]``;
    state fp32 ``[slots, H, K, V]``. Returns o ``[N, H, V]`` in v's dtype.
    """
    if state.is_cuda:
        return _recurrent_triton("gdn", q, k, v, g, beta, state, state_idx, scale)
    if state.device.type == "cpu" and state.dtype == torch.float32:
        return _gdn_step_cpu(q, k, v, g, beta, state, state_idx, scale)
    idx = state_idx.long()
    o, S = recurrent_gated_delta_rule(
        *(x.float()[:, None] for x in (q, k, v, g, beta)), scale=scale, state=state[idx]
    )
    state[idx] = S
    return o[:, 0].to(v.dtype)


def gla_decode_(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, state: Tensor, state_idx: Tensor, scale: float
) -> Tensor:
    """GLA step: per head ``S = diag(exp(gk)) S + k v^T; o = scale S^T q``.

    q, k, gk ``[N, H, K]``, v ``[N, H, V]``; state fp32 ``[slots, H, K, V]``. Returns o ``[N, H, V]`` in v's dtype.
    """
    if state.is_cuda:
        return _recurrent_triton("gla", q, k, v, gk, None, state, state_idx, scale)
    if state.device.type == "cpu" and state.dtype == torch.float32:
        return _gla_step_cpu(q, k, v, gk, state, state_idx, scale)
    idx = state_idx.long()
    o, S = recurrent_gla(*(x.float()[:, None] for x in (q, k, v, gk)), scale=scale, state=state[idx])
    state[idx] = S
    return o[:, 0].to(v.dtype)


def short_conv_decode_(
    x: Tensor, weight: Tensor, conv_state: Tensor, state_idx: Tensor, activation: str | None = "silu"
) -> Tensor:
    """Causal depthwise conv of one token: ``y = act(sum_j weight[:, j] * [state, x][j])``, then the
    state drops its oldest input and appends x.

    x ``[N, C]``, weight ``[C, W]``, conv_state ``[slots, C, W-1]``. Computed in fp32 (state values
    rounded to x's dtype first); returns y ``[N, C]`` in x's dtype.
    """
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if x.is_cuda:
        return _short_conv_triton(x, weight, conv_state, state_idx, activation == "silu")
    if x.device.type == "cpu":
        return _short_conv_step_cpu(x, weight, conv_state, state_idx, activation == "silu")
    idx = state_idx.long()
    y, new_state = short_conv(x[:, None], weight, conv_state=conv_state[idx], activation=activation)
    conv_state[idx] = new_state.to(conv_state.dtype)
    return y[:, 0]


def _gdn_step_cpu(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, state_idx: Tensor, scale: float
) -> Tensor:
    """The step of :func:`gdn_decode_` as a few batched fp32 matrix products over ``N·H`` heads."""
    N, H, K = q.shape
    V = v.shape[-1]
    idx = state_idx.long()
    S = state.index_select(0, idx).mul_(g.float().exp()[..., None, None]).view(N * H, K, V)
    k_col = k.float().reshape(N * H, K, 1)
    u = (v.float().reshape(N * H, 1, V) - k_col.transpose(1, 2).bmm(S)).mul_(beta.float().reshape(N * H, 1, 1))
    S.baddbmm_(k_col, u)
    o = q.float().reshape(N * H, 1, K).bmm(S).mul_(scale)
    state.index_copy_(0, idx, S.view(N, H, K, V))
    return o.view(N, H, V).to(v.dtype)


def _gla_step_cpu(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, state: Tensor, state_idx: Tensor, scale: float
) -> Tensor:
    """The step of :func:`gla_decode_` as a few batched fp32 matrix products over ``N·H`` heads."""
    N, H, K = q.shape
    V = v.shape[-1]
    idx = state_idx.long()
    S = state.index_select(0, idx).mul_(gk.float().exp()[..., None]).view(N * H, K, V)
    S.baddbmm_(k.float().reshape(N * H, K, 1), v.float().reshape(N * H, 1, V))
    o = q.float().reshape(N * H, 1, K).bmm(S).mul_(scale)
    state.index_copy_(0, idx, S.view(N, H, K, V))
    return o.view(N, H, V).to(v.dtype)


def _short_conv_step_cpu(x: Tensor, weight: Tensor, conv_state: Tensor, state_idx: Tensor, silu: bool) -> Tensor:
    """The step of :func:`short_conv_decode_` on one ``[N, C, W]`` window of past inputs and x."""
    idx = state_idx.long()
    window = torch.cat([conv_state.index_select(0, idx).to(x.dtype), x[..., None]], -1)
    y = (window.float() * weight.float()).sum(-1)
    conv_state.index_copy_(0, idx, window[..., 1:].to(conv_state.dtype))
    return (F.silu(y) if silu else y).to(x.dtype)


def _recurrent_triton(
    op: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
    state: Tensor, state_idx: Tensor, scale: float,
) -> Tensor:
    N, H, K = q.shape
    V = v.shape[-1]
    if state.stride(-1) != 1 or state.stride(-2) != V:
        raise ValueError("state must have contiguous [K, V] matrices")
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    o = torch.empty_like(v)
    BV = min(V, 32 if K > 64 else 64)
    common = dict(K=K, V=V, BV=BV, num_warps=4)
    grid = (N, H, V // BV)
    if op == "gdn":
        _gdn_kernel[grid](q, k, v, g, beta.contiguous(), state, state_idx, o, scale, H, state.stride(0), state.stride(1), **common)
    else:
        _gla_kernel[grid](q, k, v, g, state, state_idx, o, scale, H, state.stride(0), state.stride(1), **common)
    return o


def _short_conv_triton(x: Tensor, weight: Tensor, conv_state: Tensor, state_idx: Tensor, silu: bool) -> Tensor:
    N, C = x.shape
    W = weight.shape[1]
    x = x.contiguous()
    y = torch.empty_like(x)
    BC = 256
    _short_conv_kernel[(N, -(-C // BC))](
        x, weight, conv_state, state_idx, y, C, weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        W=W, BC=BC, SILU=silu, num_warps=4,
    )
    return y


if triton is not None:

    @triton.jit
    def _gdn_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, idx_ptr, o_ptr, scale, H, stride_sn, stride_sh,
        K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    ):
        """One (sequence, head, V block): the K x BV state tile is read and written once."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        vv = tl.program_id(2) * BV + tl.arange(0, BV)
        kk = tl.arange(0, K)
        nh = n * H + h
        slot = tl.load(idx_ptr + n).to(tl.int64)
        s_ptrs = s_ptr + slot * stride_sn + h * stride_sh + kk[:, None] * V + vv[None, :]
        S = tl.load(s_ptrs)
        q = tl.load(q_ptr + nh * K + kk).to(tl.float32)
        k = tl.load(k_ptr + nh * K + kk).to(tl.float32)
        v = tl.load(v_ptr + nh * V + vv).to(tl.float32)
        g = tl.load(g_ptr + nh).to(tl.float32)
        beta = tl.load(beta_ptr + nh).to(tl.float32)
        S = S * tl.exp(g)
        u = beta * (v - tl.sum(S * k[:, None], 0))
        S = S + k[:, None] * u[None, :]
        o = scale * tl.sum(S * q[:, None], 0)
        tl.store(s_ptrs, S)
        tl.store(o_ptr + nh * V + vv, o.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _gla_kernel(
        q_ptr, k_ptr, v_ptr, gk_ptr, s_ptr, idx_ptr, o_ptr, scale, H, stride_sn, stride_sh,
        K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    ):
        """One (sequence, head, V block): the K x BV state tile is read and written once."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        vv = tl.program_id(2) * BV + tl.arange(0, BV)
        kk = tl.arange(0, K)
        nh = n * H + h
        slot = tl.load(idx_ptr + n).to(tl.int64)
        s_ptrs = s_ptr + slot * stride_sn + h * stride_sh + kk[:, None] * V + vv[None, :]
        S = tl.load(s_ptrs)
        q = tl.load(q_ptr + nh * K + kk).to(tl.float32)
        k = tl.load(k_ptr + nh * K + kk).to(tl.float32)
        v = tl.load(v_ptr + nh * V + vv).to(tl.float32)
        gk = tl.load(gk_ptr + nh * K + kk).to(tl.float32)
        S = S * tl.exp(gk)[:, None] + k[:, None] * v[None, :]
        o = scale * tl.sum(S * q[:, None], 0)
        tl.store(s_ptrs, S)
        tl.store(o_ptr + nh * V + vv, o.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _short_conv_kernel(
        x_ptr, w_ptr, s_ptr, idx_ptr, y_ptr, C, stride_wc, stride_ww, stride_sn, stride_sc, stride_sw,
        W: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
    ):
        """One (sequence, channel block): conv output, then the state shifted by one input."""
        n = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        c_mask = c < C
        slot = tl.load(idx_ptr + n).to(tl.int64)
        x = tl.load(x_ptr + n * C + c, mask=c_mask, other=0.0)
        w_row = w_ptr + c * stride_wc
        s_row = s_ptr + slot * stride_sn + c * stride_sc
        acc = tl.zeros([BC], tl.float32)
        for j in tl.static_range(W - 1):
            past = tl.load(s_row + j * stride_sw, mask=c_mask, other=0.0).to(x.dtype)
            acc += tl.load(w_row + j * stride_ww, mask=c_mask, other=0.0).to(tl.float32) * past.to(tl.float32)
        acc += tl.load(w_row + (W - 1) * stride_ww, mask=c_mask, other=0.0).to(tl.float32) * x.to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_ptr + n * C + c, acc.to(y_ptr.dtype.element_ty), mask=c_mask)
        for j in tl.static_range(W - 2):
            nxt = tl.load(s_row + (j + 1) * stride_sw, mask=c_mask, other=0.0)
            tl.store(s_row + j * stride_sw, nxt, mask=c_mask)
        tl.store(s_row + (W - 2) * stride_sw, x.to(s_ptr.dtype.element_ty), mask=c_mask)
