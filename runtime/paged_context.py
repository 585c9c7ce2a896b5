"""`PagedContext`: the packed, paged execution setting of the serving engine.

The tokens of every scheduled sequence (prefill chunks and single decode tokens) are packed into
one `[1, T]` batch described by a `StepMetadata`. Softmax layers write their new K/V into the paged
pool and attend through the block tables, with no gather; linear layers update their state slots in
place on decode steps and load/store them around chunked prefill. The layer modules are the same
ones `HybridForCausalLM.forward` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyla.runtime.context import ForwardContext, LinearSlots, PagedKV
from hyla.runtime.kv_cache import PagedKVCache
from hyla.runtime.ops.paged_attention import paged_decode_attention, paged_prefill_attention
from hyla.runtime.state_pool import StatePool


@dataclass
class StepMetadata:
    """Device tensors describing one packed pass of N chunks and T tokens."""

    input_ids: torch.Tensor
    """`[T]` token ids."""
    positions: torch.Tensor
    """`[T]` absolute positions."""
    slot_mapping: torch.Tensor
    """`[T]` KV token slots the new keys/values go to."""
    state_idx: torch.Tensor
    """`[N]` state slot of each chunk's sequence (also its row of the block-table pool)."""
    block_tables: torch.Tensor
    """`[N, max_blocks]` int32 KV blocks of each sequence."""
    context_lens: torch.Tensor
    """`[N]` int32 tokens each sequence holds after this pass."""
    cu_seqlens: torch.Tensor
    """`[N + 1]` offsets of the chunks in the packed batch."""
    max_query_len: int
    max_context_len: int
    """An upper bound of `context_lens` fixed for the engine's life (CUDA graphs capture it)."""

    @property
    def decode(self) -> bool:
        """One token per sequence."""
        return self.max_query_len == 1


class PagedContext(ForwardContext):
    """Packed varlen forward over the paged KV pool and the linear-state slots."""

    def __init__(self, meta: StepMetadata, kv: PagedKVCache, states: StatePool) -> None:
        self.meta, self.kv, self.states = meta, kv, states
        self.position_ids = meta.positions[None]
        self.cu_seqlens = meta.cu_seqlens
        self.max_seq_len = meta.max_query_len

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        self.kv.write(layer_idx, m.slot_mapping, k[0], v[0])
        keys, values = self.kv.keys_values(layer_idx)
        scale = q.shape[-1] ** -0.5
        if m.decode:
            out = paged_decode_attention(
                q[0], keys, values, m.block_tables, m.context_lens, scale,
                max_context_len=m.max_context_len, block_size=self.kv.block_size,
            )
        else:
            out = paged_prefill_attention(
                q[0], keys, values, m.block_tables, m.cu_seqlens, m.context_lens, scale,
                max_query_len=m.max_query_len, block_size=self.kv.block_size,
            )
        return out[None]

    def paged_kv(self, layer_idx: int) -> PagedKV | None:
        m = self.meta
        keys, values = self.kv.keys_values(layer_idx)
        return PagedKV(keys, values, m.slot_mapping, m.block_tables, m.context_lens, m.cu_seqlens, m.decode,
                       self.kv.block_size)

    def decode_slots(self, layer_idx: int) -> LinearSlots | None:
        return self.pooled_slots(layer_idx) if self.meta.decode else None

    def pooled_slots(self, layer_idx: int) -> LinearSlots | None:
        conv, recurrent = self.states.layer(layer_idx)
        if recurrent.dtype != torch.float32:
            return None
        return LinearSlots(conv, recurrent, self.meta.state_idx)

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.states.load(layer_idx, self.meta.state_idx)

    def store_linear_state(self, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        self.states.store(layer_idx, self.meta.state_idx, conv, recurrent)
