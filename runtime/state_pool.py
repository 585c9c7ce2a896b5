"""`StatePool`: fixed-size per-sequence state of the linear layers, one slot per running sequence."""

from __future__ import annotations

import torch

from hyla.runtime.config import HybridConfig


class StatePool:
    """Conv state `[layers, slots, 3·H·D, W-1]` (model dtype) and recurrent state
    `[layers, slots, H, D, D]` (`state_dtype`) of every linear layer.

    A slot is zeroed when it is handed out, so a new sequence never sees its predecessor's state.
    """

    def __init__(
        self,
        config: HybridConfig,
        num_slots: int,
        dtype: torch.dtype,
        state_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.layer_index = {layer: i for i, layer in enumerate(config.linear_layers)}
        n, h, d = len(self.layer_index), config.num_attention_heads, config.head_dim
        width = config.linear_conv_size - 1
        self.conv = (
            torch.zeros(n, num_slots, 3 * h * d, width, dtype=dtype, device=device) if width > 0 else None
        )
        self.recurrent = torch.zeros(n, num_slots, h, d, d, dtype=state_dtype, device=device)
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        """A free slot, zeroed."""
        slot = self._free.pop()
        if self.conv is not None:
            self.conv[:, slot].zero_()
        self.recurrent[:, slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def copy(self, src: int, dst: int) -> None:
        """Give slot `dst` the states of slot `src` (forking a sequence)."""
        if self.conv is not None:
            self.conv[:, dst] = self.conv[:, src]
        self.recurrent[:, dst] = self.recurrent[:, src]

    def load(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(conv, recurrent) states of `slots` for one linear layer."""
        i = self.layer_index[layer_idx]
        conv = None if self.conv is None else self.conv[i, slots]
        return conv, self.recurrent[i, slots]

    def store(
        self, layer_idx: int, slots: torch.Tensor, conv: torch.Tensor | None, recurrent: torch.Tensor | None
    ) -> None:
        i = self.layer_index[layer_idx]
        if conv is not None and self.conv is not None:
            self.conv[i].index_copy_(0, slots, conv.to(self.conv.dtype))
        if recurrent is not None:
            self.recurrent[i].index_copy_(0, slots, recurrent.to(self.recurrent.dtype))
