"""Public linear-attention ops: validate arguments and pick a backend by device.

CUDA tensors go to the fla-core kernels (:mod:`.fla_backend`) unless a backward is needed that fla
cannot run on that GPU; everything else runs the PyTorch reference (:mod:`.delta_rule`, :mod:`.gla`)
in fp32, with varlen batches padded into a dense one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from .gla import chunk_gla, recurrent_gla

RECURRENT_MAX_LEN = 2  # CPU "auto" uses the recurrent form up to this sequence length
CUDA_RECURRENT_MAX_LEN = 128
"""CUDA "auto" inference takes fla's one-kernel recurrent form for sequences up to two chunks long:
the chunked form launches several kernels a layer, whose host time outweighs their device time on
short prefills (prefix-cache suffixes, chat turns), and reads the chunk layout on the host, which a
CUDA graph cannot capture."""
MODES = ("auto", "chunk", "recurrent")


def chunk_length(max_len: int) -> int:
    """Chunk length of the CPU chunked forms for a (padded) batch of `max_len` tokens. The
    intra-chunk work grows with the square of it and every sequence is padded to whole chunks, so
    short prompts (lm-eval endings, prefix-cache suffixes) take 16; longer ones 32, which measured
    faster than 64 from 100 to 4,096 tokens on a 2-core CPU."""
    return 16 if max_len <= 128 else 32


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = True,
    mode: str = "auto",
    max_len: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated DeltaNet. q, k ``[B, T, H, K]`` (L2-normalised by the caller), v ``[B, T, H, V]``,
    log-decay g and beta ``[B, T, H]``. States are fp32 ``[N, H, K, V]``; o has q's dtype.
    ``max_len``, the longest sequence when the caller knows it, lets "auto" pick the kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _check(q, k, v, initial_state, cu_seqlens, mode)
    if _use_fla("gdn", q, k, v, g, beta, initial_state):
        from . import fla_backend

        return fla_backend.gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
            output_final_state=output_final_state, recurrent=_cuda_recurrent(q, cu_seqlens, mode, max_len),
        )
    fn = recurrent_gated_delta_rule if _reference_recurrent(q, cu_seqlens, mode, max_len) else chunk_gated_delta_rule
    return _run_reference(fn, (q, k, v, g, beta), scale, initial_state, cu_seqlens, output_final_state)


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = True,
    mode: str = "auto",
    max_len: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention. q, k, per-key-dim log-decay gk ``[B, T, H, K]``, v ``[B, T, H, V]``.
    States are fp32 ``[N, H, K, V]``; o has q's dtype. ``max_len`` as for `gated_delta_rule`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _check(q, k, v, initial_state, cu_seqlens, mode)
    if _use_fla("gla", q, k, v, gk, initial_state):
        from . import fla_backend

        return fla_backend.gated_linear_attention(
            q, k, v, gk, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
            output_final_state=output_final_state, recurrent=_cuda_recurrent(q, cu_seqlens, mode, max_len),
        )
    fn = recurrent_gla if _reference_recurrent(q, cu_seqlens, mode, max_len) else chunk_gla
    return _run_reference(fn, (q, k, v, gk), scale, initial_state, cu_seqlens, output_final_state)


def _check(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | None, mode: str
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"batch size must be 1 with cu_seqlens, got {q.shape[0]}")
    B, _, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    expected = (N, H, K, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must have shape {expected}, got {tuple(initial_state.shape)}")


def _use_fla(op: str, q: Tensor, *tensors: Tensor | None) -> bool:
    """CUDA inputs take fla, except where autograd needs a backward that fla refuses on this GPU."""
    if not q.is_cuda:
        return False
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (q, *tensors)):
        return True
    from . import fla_backend

    return fla_backend.trains(op, q.device)


def _cuda_recurrent(q: Tensor, cu_seqlens: Tensor | None, mode: str, max_len: int | None) -> bool:
    if mode != "auto":
        return mode == "recurrent"
    # all sequences hold one token (decode); read from shapes to avoid a device sync
    n_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if q.shape[0] * q.shape[1] == n_seqs:
        return True
    short = max_len is not None and max_len <= CUDA_RECURRENT_MAX_LEN
    return short and not (torch.is_grad_enabled() and q.requires_grad)


def _reference_recurrent(q: Tensor, cu_seqlens: Tensor | None, mode: str, max_len: int | None) -> bool:
    if mode != "auto":
        return mode == "recurrent"
    if max_len is None:
        max_len = q.shape[1] if cu_seqlens is None else int(cu_seqlens.diff().max())
    return max_len <= RECURRENT_MAX_LEN


def _run_reference(
    fn: Callable[..., tuple[Tensor, Tensor]],
    inputs: tuple[Tensor, ...],
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run a dense fp32 reference kernel; a varlen batch is padded to ``[n, len, ...]`` per group of
    sequences of similar length (`_length_groups`), so a short sequence does not pay for a long one."""
    q, v = inputs[0], inputs[2]
    xs = [x.float() for x in inputs]
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunked = fn in (chunk_gated_delta_rule, chunk_gla)
    if cu_seqlens is None:
        state = xs[0].new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
        o, final = _dense(fn, xs, scale, state, chunk_length(T) if chunked else 0)
        return o.to(q.dtype), final if output_final_state else None
    cu = cu_seqlens.to(q.device, torch.long)
    lens_t = cu.diff()
    lens = lens_t.tolist()
    unit = chunk_length(max(lens, default=0)) if chunked else 1
    chunks = [-(-n // unit) for n in lens]
    o = xs[2].new_zeros(1, T, H, V)
    final = xs[0].new_zeros(len(lens), H, K, V) if initial_state is None else initial_state.float().clone()
    for group in _length_groups(chunks):
        padded = chunks[group[0]] * unit
        if padded == 0:  # empty sequences keep their state
            continue
        sel = torch.tensor(group, device=q.device)
        steps = torch.arange(padded, device=q.device)
        valid = steps < lens_t[sel, None]
        idx = (cu[sel, None] + steps).clamp(max=max(T - 1, 0))
        # zero padding after each sequence is an identity step for both recurrences
        xg = [torch.where(_bcast(valid, x), x[0, idx], 0.0) for x in xs]
        og, final[sel] = _dense(fn, xg, scale, final[sel], unit if chunked else 0)
        o[0, idx[valid]] = og[valid]
    return o.to(q.dtype), final if output_final_state else None


def _dense(
    fn: Callable[..., tuple[Tensor, Tensor]], xs: list[Tensor], scale: float, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    with torch.autocast(xs[0].device.type, enabled=False):
        return fn(*xs, scale, state, **kwargs)


def _length_groups(chunks: list[int]) -> list[list[int]]:
    """Sequence indices, longest first, in groups padded to their first member's chunk count: a
    group takes the next sequences while they have at least half of it (their padding at most
    doubles their work; fewer groups keep the per-call overhead down)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(chunks)), key=lambda i: -chunks[i]):
        if groups and 2 * chunks[i] >= chunks[groups[-1][0]] > 0:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _bcast(mask: Tensor, x: Tensor) -> Tensor:
    return mask.reshape(*mask.shape, *([1] * (x.dim() - 2)))
