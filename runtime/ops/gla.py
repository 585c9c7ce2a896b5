"""Gated linear attention with a per-key-dim gate in plain PyTorch: recurrent and chunked forms.

Both functions take dense batches in fp32: q, k, gk ``[B, T, H, K]``, v ``[B, T, H, V]`` and the
state ``[B, H, K, V]``; they return ``(o, final_state)``.
Per head and step: ``S = diag(exp(gk)) S + k v^T``; ``o = scale S^T q``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]``, zero-padding T to a multiple of C.

    Zero padding is an identity step for both recurrences (no decay, no update).
    """
    B, T, H = x.shape[:3]
    pad = -T % chunk_size
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], 1)
    return x.reshape(B, -1, chunk_size, *x.shape[2:]).movedim(3, 1)


def recurrent_gla(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, scale: float, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence, vectorised over batch and heads."""
    S = state.clone()
    o = v.new_empty(v.shape)
    for t in range(q.shape[1]):
        S = S * gk[:, t].exp()[..., None] + k[:, t, ..., None] * v[:, t, :, None, :]
        o[:, t] = scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o, S


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    scale: float,
    state: Tensor,
    chunk_size: int = 64,
    sub_chunk: int = 16,
) -> tuple[Tensor, Tensor]:
    """Chunked form.

    With cumulative log-decay ``G`` inside a chunk and start state ``S0``:
    ``O = scale (exp(G) Q S0 + P V)`` with causal scores ``P`` (see :func:`intra_chunk_scores`)
    and ``S = diag(exp(G_C)) S0 + (exp(G_C - G) K)^T V``. Only the state hand-over between chunks
    is sequential.
    """
    B, T, H, _ = q.shape
    q, k, v, gk = (to_chunks(x, chunk_size) for x in (q, k, v, gk))  # [B, H, N, C, ...]
    G = gk.cumsum(-2)
    q_g = q * G.exp()
    k_end = k * (G[..., -1:, :] - G).exp()
    g_end = G[..., -1, :].exp()[..., None]

    S = state.clone()
    o = v.new_empty(v.shape)
    for n in range(q.shape[2]):
        scores = intra_chunk_scores(q[:, :, n], k[:, :, n], G[:, :, n], sub_chunk)
        o[:, :, n] = q_g[:, :, n] @ S + scores @ v[:, :, n]
        S = g_end[:, :, n] * S + k_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = scale * o.flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, S


def intra_chunk_scores(q: Tensor, k: Tensor, G: Tensor, sub_chunk: int) -> Tensor:
    """Causal scores ``P_ij = sum_d q_id k_jd exp(G_id - G_jd)`` (``j <= i``) of one chunk.

    q, k, G are ``[B, H, C, K]``; returns ``[B, H, C, C]``. Pairs in different sub-chunks factor
    through ``R``, the cumulative decay just before the query's sub-chunk, as
    ``(q_i exp(G_i - R)) . (k_j exp(R - G_j))`` with both exponents <= 0, so it is a plain matmul
    that cannot overflow. Pairs inside a sub-chunk use the exact pairwise decays.
    """
    B, H, C, K = q.shape
    M = C // sub_chunk
    q_b, k_b, G_b = (x.unflatten(-2, (M, sub_chunk)) for x in (q, k, G))  # [B, H, M, c, K]
    ref = torch.cat([torch.zeros_like(G[..., :1, :]), G_b[..., :-1, -1, :]], -2)  # [B, H, M, K]
    block = torch.arange(C, device=q.device) // sub_chunk
    earlier = block < torch.arange(M, device=q.device)[:, None]  # [M, C]
    k_ref = (ref[..., :, None, :] - G[..., None, :, :]).masked_fill(~earlier[..., None], float("-inf"))
    k_ref = k[..., None, :, :] * k_ref.exp()  # [B, H, M, C, K]
    scores = (q_b * (G_b - ref[..., None, :]).exp()) @ k_ref.transpose(-1, -2)  # [B, H, M, c, C]

    lower = torch.ones(sub_chunk, sub_chunk, dtype=torch.bool, device=q.device).tril()[..., None]
    decay = (G_b[..., :, None, :] - G_b[..., None, :, :]).masked_fill(~lower, float("-inf")).exp()
    diag = (q_b[..., :, None, :] * k_b[..., None, :, :] * decay).sum(-1)  # [B, H, M, c, c]
    eye = torch.eye(M, dtype=q.dtype, device=q.device)
    scores = scores + torch.einsum("bhmij,mn->bhminj", diag, eye).flatten(-2)
    return scores.flatten(2, 3)
