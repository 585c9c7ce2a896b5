"""HF `generate` timed with the same definitions as the engine (see `bench_timing`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from hyla.runtime.bench_timing import BatchTiming


class _StepClock(LogitsProcessor):
    """Records when each forward pass's logits are ready (the first call follows the prefill)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@contextmanager
def hf_at_its_best(device: torch.device) -> Iterator[None]:
    """On CUDA, SDPA without the cuDNN backend (slower for HF's padded decode); nothing on CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@torch.inference_mode()
def time_hf(model: PreTrainedModel, prompts: list[list[int]], max_tokens: int, pad_id: int) -> BatchTiming:
    """Greedy `generate` of exactly `max_tokens` tokens for the batch of (equal-length) `prompts`."""
    ids = torch.tensor(prompts, device=model.device)
    clock = _StepClock(ids.device)
    with hf_at_its_best(ids.device):
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]),
        )
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        total = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + max_tokens:
        raise RuntimeError(f"HF generate made {out.shape[1] - ids.shape[1]} tokens, expected {max_tokens}")
    first, last = clock.times[0] - start, clock.times[-1] - start
    return BatchTiming(
        ttft_s=[first] * len(prompts), prefill_s=first, decode_step_s=(last - first) / max(max_tokens - 1, 1),
        decode_timing="steps", total_s=total,
    )
