"""`ModelRunner`: packs scheduled chunks into one batch, runs the model, returns the logits asked for."""

from __future__ import annotations

import torch

from hyla.runtime.kv_cache import PagedKVCache
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.paged_context import PagedContext, SeqChunk
from hyla.runtime.state_pool import StatePool


class ModelRunner:
    """Runs `HybridForCausalLM`'s own layers under a `PagedContext`; the LM head only on needed rows."""

    def __init__(self, model: HybridForCausalLM, kv: PagedKVCache, states: StatePool) -> None:
        self.model, self.kv, self.states = model, kv, states
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(
        self,
        chunks: list[SeqChunk],
        token_ids: list[list[int]],
        logit_rows: list[list[int]],
        block_copies: list[tuple[int, int]] = (),
    ) -> list[torch.Tensor]:
        """Run `token_ids[i]` (the new tokens of `chunks[i]`); return fp32 logits `[len(rows), V]` for
        the chunk-relative `logit_rows[i]` of each chunk."""
        self.kv.copy_blocks(list(block_copies))
        ctx = PagedContext(chunks, self.kv, self.states, self.device)
        flat = [t for ids in token_ids for t in ids]
        input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)[None]
        hidden = self.model.model(input_ids, ctx)[0]
        starts = ctx.cu_seqlens[:-1].tolist()
        rows = [start + r for start, chunk_rows in zip(starts, logit_rows) for r in chunk_rows]
        if not rows:
            return [hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32) for _ in chunks]
        logits = self.model.lm_head(hidden[torch.tensor(rows, device=self.device)]).float()
        return list(logits.split([len(r) for r in logit_rows]))
