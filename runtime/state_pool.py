"""`StatePool`: the tensors holding every linear layer's per-sequence state, one row per state slot or
prefix-cache snapshot.

Which row belongs to which sequence or snapshot is the `CacheManager`'s business; this class only stores.
"""

from __future__ import annotations

import torch

from hyla.runtime.config import HybridConfig
from hyla.runtime.cpu_memory import zeros


class StatePool:
    """Conv state `[layers, slots, 3·H·D, W-1]` (model dtype) and recurrent state
    `[layers, slots, H, D, D]` (`state_dtype`) of every linear layer."""

    def __init__(
        self,
        config: HybridConfig,
        num_slots: int,
        dtype: torch.dtype,
        state_dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_slots = num_slots
        self.layer_index = {layer: i for i, layer in enumerate(config.linear_layers)}
        n, h, d = len(self.layer_index), config.num_attention_heads, config.head_dim
        width = config.linear_conv_size - 1
        self.conv = zeros((n, num_slots, 3 * h * d, width), dtype, device) if width > 0 else None
        self.recurrent = zeros((n, num_slots, h, d, d), state_dtype, device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(conv `[slots, C, W-1]` or None, recurrent `[slots, H, D, D]`) views of one layer."""
        i = self.layer_index[layer_idx]
        return (None if self.conv is None else self.conv[i]), self.recurrent[i]

    def zero(self, slots: torch.Tensor) -> None:
        """Clear `slots` for sequences that start from their first token."""
        if self.conv is not None:
            self.conv.index_fill_(1, slots, 0)
        self.recurrent.index_fill_(1, slots, 0)

    def copy(self, src: int, dst: int) -> None:
        """Give row `dst` the states of row `src` (forking a sequence, taking or restoring a snapshot)."""
        if self.conv is not None:
            self.conv[:, dst] = self.conv[:, src]
        self.recurrent[:, dst] = self.recurrent[:, src]

    def copy_rows(self, pairs: list[tuple[int, int]]) -> None:
        """`copy(src, dst)` for each pair in order; as one gather and one scatter per pool when no
        pair reads a row an earlier one writes."""
        dsts = [d for _, d in pairs]
        if len(pairs) < 2 or len(set(dsts)) < len(dsts) or set(dsts) & {s for s, _ in pairs}:
            for src, dst in pairs:
                self.copy(src, dst)
            return
        device = self.recurrent.device
        index = torch.tensor(pairs, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        for pool in (self.conv, self.recurrent):
            if pool is not None:
                pool.index_copy_(1, index[:, 1], pool.index_select(1, index[:, 0]))

    def load(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(conv, recurrent) states of `slots` for one linear layer (copies)."""
        conv, recurrent = self.layer(layer_idx)
        return (None if conv is None else conv[slots]), recurrent[slots]

    def store(
        self, layer_idx: int, slots: torch.Tensor, conv: torch.Tensor | None, recurrent: torch.Tensor | None
    ) -> None:
        conv_pool, recurrent_pool = self.layer(layer_idx)
        if conv is not None and conv_pool is not None:
            conv_pool.index_copy_(0, slots, conv.to(conv_pool.dtype))
        if recurrent is not None:
            recurrent_pool.index_copy_(0, slots, recurrent.to(recurrent_pool.dtype))
