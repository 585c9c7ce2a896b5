"""`PagedKVCache`: the preallocated K/V storage of the softmax layers, addressed by token slot."""

from __future__ import annotations

import torch

from hyla.runtime.config import HybridConfig
from hyla.runtime.cpu_memory import zeros
from hyla.runtime.ops import cpu_kernels


class PagedKVCache:
    """K and V of every softmax layer in one tensor `[layers, 2, blocks · block_size, Hkv, D]`.

    Token slot `block · block_size + offset` holds one token's K/V; linear layers get no storage.
    """

    def __init__(
        self, config: HybridConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.block_size = block_size
        self.layer_index = {layer: i for i, layer in enumerate(config.softmax_layers)}
        self.data = zeros(
            (len(self.layer_index), 2, num_blocks * block_size, config.num_key_value_heads, config.head_dim),
            dtype, device,
        )

    def keys_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[slots, Hkv, D]` views of one layer's K and V."""
        kv = self.data[self.layer_index[layer_idx]]
        return kv[0], kv[1]

    def write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `[T, Hkv, D]` keys/values at token `slots` `[T]` (one C++ op on CPU)."""
        keys, values = self.keys_values(layer_idx)
        if cpu_kernels.usable(k, v, keys, values):
            cpu_kernels.store_kv(k, v, keys, values, slots)
        else:
            keys.index_copy_(0, slots, k.to(keys.dtype))
            values.index_copy_(0, slots, v.to(values.dtype))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (src -> dst) in every layer."""
        if not pairs or self.data.numel() == 0:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in pairs for i in range(bs)], device=self.data.device)
        dst = torch.tensor([d * bs + i for _, d in pairs for i in range(bs)], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]
