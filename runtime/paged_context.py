"""`PagedContext`: the packed, paged execution setting of the serving engine.

The tokens of every scheduled sequence (prefill chunks and single decode tokens) are packed into
one `[1, T]` batch with `cu_seqlens`. Softmax layers write their new K/V into the paged pool and
attend over each sequence's blocks by gathering them; linear layers read and write their states in
the sequences' slots. The layer modules are the same ones `HybridForCausalLM.forward` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyla.runtime.context import ForwardContext, expand_kv_heads
from hyla.runtime.kv_cache import PagedKVCache
from hyla.runtime.state_pool import StatePool


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a packed batch: `num_tokens` new tokens after `start` computed ones."""

    start: int
    num_tokens: int
    block_table: list[int]
    slot: int


class PagedContext(ForwardContext):
    """Packed varlen forward over the paged KV pool and the linear-state slots."""

    def __init__(self, chunks: list[SeqChunk], kv: PagedKVCache, states: StatePool, device: torch.device) -> None:
        self.kv, self.states = kv, states
        bs = kv.block_size
        lens = [c.num_tokens for c in chunks]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        self.cu_seqlens = torch.tensor(offsets, dtype=torch.long, device=device)
        positions = [p for c in chunks for p in range(c.start, c.start + c.num_tokens)]
        self.position_ids = torch.tensor(positions, dtype=torch.long, device=device)[None]
        self.slots = torch.tensor([c.slot for c in chunks], dtype=torch.long, device=device)

        def token_slots(table: list[int], lo: int, hi: int) -> torch.Tensor:
            pos = torch.arange(lo, hi)
            return torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs

        self.write_slots = torch.cat(
            [token_slots(c.block_table, c.start, c.start + c.num_tokens) for c in chunks]
        ).to(device)
        # Decode rows (one new token) attend together over padded gathered contexts.
        decode = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
        self.decode_rows = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=device)
        self.decode_index = self.decode_mask = None
        if decode:
            width = max(chunks[i].start + 1 for i in decode)
            index = torch.zeros(len(decode), width, dtype=torch.long)
            for row, i in enumerate(decode):
                c = chunks[i]
                index[row, : c.start + 1] = token_slots(c.block_table, 0, c.start + 1)
            lengths = torch.tensor([chunks[i].start + 1 for i in decode])
            self.decode_index = index.to(device)
            self.decode_mask = (torch.arange(width)[None] < lengths[:, None]).to(device)[:, None, None, :]
        # Prefill chunks attend one at a time: (first row, rows, gathered slots, causal mask or None).
        self.prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        for i, c in enumerate(chunks):
            if c.num_tokens == 1:
                continue
            total = c.start + c.num_tokens
            index = token_slots(c.block_table, 0, total).to(device)
            mask = None
            if c.start:
                q_pos = torch.arange(c.start, total, device=device)[:, None]
                mask = torch.arange(total, device=device)[None] <= q_pos
            self.prefills.append((offsets[i], c.num_tokens, index, mask))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.kv.write(layer_idx, self.write_slots, k[0], v[0])
        keys, values = self.kv.keys_values(layer_idx)
        heads = q.shape[2]
        out = torch.empty_like(q[0])
        if self.decode_index is not None:
            qd = q[0, self.decode_rows][:, :, None]  # [N, Hq, 1, D]
            kd = expand_kv_heads(keys[self.decode_index].transpose(1, 2), heads)
            vd = expand_kv_heads(values[self.decode_index].transpose(1, 2), heads)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask)
            out[self.decode_rows] = od[:, :, 0]
        for first, n, index, mask in self.prefills:
            qp = q[0, first : first + n].transpose(0, 1)[None]  # [1, Hq, n, D]
            kp = expand_kv_heads(keys[index].transpose(0, 1)[None], heads)
            vp = expand_kv_heads(values[index].transpose(0, 1)[None], heads)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None)
            out[first : first + n] = op[0].transpose(0, 1)
        return out[None]

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.states.load(layer_idx, self.slots)

    def store_linear_state(self, layer_idx: int, conv: torch.Tensor | None, recurrent: torch.Tensor | None) -> None:
        self.states.store(layer_idx, self.slots, conv, recurrent)
