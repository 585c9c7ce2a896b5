"""Gated delta rule (Gated DeltaNet) in plain PyTorch: recurrent and chunked (WY) forms.

Both functions take dense batches in fp32: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
g, beta ``[B, T, H]`` and the state ``[B, H, K, V]``; they return ``(o, final_state)``.
Per head and step: ``S = exp(g) S``; ``S += beta k (v - S^T k)^T``; ``o = scale S^T q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gla import to_chunks


def recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence, vectorised over batch and heads."""
    S = state.clone()
    o = v.new_empty(v.shape)
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        k_t = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t[..., None] * u[..., None, :]
        o[:, t] = scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked form: intra-chunk WY representation via a unit-lower-triangular solve.

    Within a chunk with cumulative log-decay ``G`` and start state ``S0`` the delta values are
    ``U = (I + A)^{-1} (beta V - beta exp(G) K S0)`` with
    ``A_ij = beta_i exp(G_i - G_j) k_i.k_j`` for ``j < i``; then
    ``O = scale (exp(G) Q S0 + (Q K^T * D) U)`` and ``S = exp(G_C) S0 + (exp(G_C - G) K)^T U``.
    Only the state hand-over between chunks is sequential.
    """
    B, T, H, _ = q.shape
    C = chunk_size
    q, k, v, g, beta = (to_chunks(x, C) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]
    G = g.cumsum(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    A = (k @ k.transpose(-1, -2)) * decay * beta[..., None]
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], -1)
    # unitriangular=True ignores A's diagonal and solves (I + strictly_lower(A)) X = rhs
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u_v, w = sol.split([v.shape[-1], k.shape[-1]], -1)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_g = q * G.exp()[..., None]
    k_end = k * (G[..., -1:] - G).exp()[..., None]
    g_end = G[..., -1].exp()[..., None, None]

    S = state.clone()
    o = v.new_empty(v.shape)
    for n in range(q.shape[2]):
        u = u_v[:, :, n] - w[:, :, n] @ S
        o[:, :, n] = q_g[:, :, n] @ S + attn[:, :, n] @ u
        S = g_end[:, :, n] * S + k_end[:, :, n].transpose(-1, -2) @ u
    o = scale * o.flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, S
