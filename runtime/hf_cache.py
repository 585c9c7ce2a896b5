"""`HybridCache`: the dense per-layer cache behind `HybridForCausalLM.generate`.

Softmax layers keep concatenated K/V; linear layers keep their conv and recurrent states.
The serving engine uses paged pools instead; this one exists for the HF-compatible path.
"""

from __future__ import annotations

import torch


class HybridCache:
    """Dense K/V for softmax layers plus conv/recurrent states for linear layers."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        self.seq_len = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already processed (HF cache protocol)."""
        return self.seq_len

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `[B, Hkv, T, D]` keys/values and return the whole history."""
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def store_state(self, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        if conv is not None:
            self.conv[layer_idx] = conv
        if recurrent is not None:
            self.recurrent[layer_idx] = recurrent

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for store in (self.keys, self.values, self.conv, self.recurrent):
            for i, t in store.items():
                store[i] = t.index_select(0, beam_idx.to(t.device))

    def nbytes(self) -> int:
        """Bytes held by all tensors of the cache."""
        stores = (self.keys, self.values, self.conv, self.recurrent)
        return sum(t.numel() * t.element_size() for s in stores for t in s.values())
