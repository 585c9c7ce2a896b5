"""Forward contexts: how one set of layer modules runs in different execution settings.

A layer never owns its cache. It asks the context to attend (softmax layers) or for its carried
state (linear layers). `DenseContext` is the full-sequence setting used by training and by the
HF `generate` path (padded `[B, T]` batches, optional dense cache); the serving engine supplies a
paged, packed context with the same interface.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hyla.runtime.hf_cache import HybridCache


class LinearSlots(NamedTuple):
    """A linear layer's state pools and the slots of this pass's sequences, updated in place."""

    conv: torch.Tensor | None
    """`[slots, C, W-1]` conv states, or None without a short conv."""
    recurrent: torch.Tensor
    """`[slots, H, K, V]` recurrent states."""
    index: torch.Tensor
    """`[N]` the slot of each sequence."""


class PagedKV(NamedTuple):
    """A softmax layer's paged K/V pools and the step's layout, for kernels that run the whole layer."""

    keys: torch.Tensor
    values: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens: torch.Tensor
    decode: bool
    block_size: int


class ForwardContext:
    """What the layers need from their surroundings for one forward pass."""

    position_ids: torch.Tensor
    """`[B, T]` absolute positions of the tokens in this pass."""
    cu_seqlens: torch.Tensor | None = None
    """Packed varlen layout: `[N + 1]` sequence offsets (B == 1), or None for a padded batch."""
    token_mask: torch.Tensor | None = None
    """`[B, T]` bool, False on (left) padding tokens, or None when every token is real."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    """cos/sin tables for `position_ids`, filled in by the model before the layers run."""
    max_seq_len: int | None = None
    """The longest sequence of this pass when the host knows it without a sync (lets linear layers
    pick their kernel), else None."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal softmax attention; q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` -> `[B, T, Hq, D]`."""
        raise NotImplementedError

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv state, recurrent state) carried into this pass; None means a fresh sequence."""
        raise NotImplementedError

    def store_linear_state(self, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        """Keep the states a linear layer leaves at the end of this pass."""
        raise NotImplementedError

    def decode_slots(self, layer_idx: int) -> LinearSlots | None:
        """On a one-token-per-sequence pass over pooled states: the pools to update in place."""
        return None

    def pooled_slots(self, layer_idx: int) -> LinearSlots | None:
        """On a packed pass (any chunk lengths) over pooled fp32 states: the pools to update in place."""
        return None

    def paged_kv(self, layer_idx: int) -> PagedKV | None:
        """On a packed pass over the paged KV pool: a softmax layer's pools and the step's layout."""
        return None


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat each KV head for the query heads of its group: `[B, Hkv, S, D]` -> `[B, Hq, S, D]`."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class DenseContext(ForwardContext):
    """Padded full-sequence forward, optionally reading and extending a `HybridCache`.

    `attention_mask` is the usual HF `[B, S_past + T]` 0/1 mask (left padding), or None.
    """

    def __init__(
        self,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
    ) -> None:
        self.position_ids = position_ids
        self.max_seq_len = position_ids.shape[1]
        self.cache = cache
        self.attention_mask = attention_mask
        t = position_ids.shape[1]
        if attention_mask is not None and not bool(attention_mask[:, -t:].all()):
            self.token_mask = attention_mask[:, -t:].bool()
        self._mask: torch.Tensor | None = None

    def _attn_mask(self, t: int, s: int, device: torch.device) -> torch.Tensor | None:
        if self.attention_mask is None and t == s:
            return None
        if self._mask is None:
            past = s - t
            q_pos = torch.arange(t, device=device)[:, None] + past
            k_pos = torch.arange(s, device=device)[None, :]
            mask = (k_pos <= q_pos)[None]
            if self.attention_mask is not None:
                valid = self.attention_mask[:, -s:].bool().to(device)[:, None, :]
                mask = mask & (valid | (k_pos == q_pos)[None])
            self._mask = mask[:, None]
        return self._mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if self.cache is not None:
            k, v = self.cache.update_kv(layer_idx, k, v)
        t, s = q.shape[2], k.shape[2]
        mask = self._attn_mask(t, s, q.device)
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return out.transpose(1, 2)

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.cache is None:
            return None, None
        return self.cache.conv.get(layer_idx), self.cache.recurrent.get(layer_idx)

    def store_linear_state(self, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        if self.cache is not None:
            self.cache.store_state(layer_idx, conv, recurrent)
