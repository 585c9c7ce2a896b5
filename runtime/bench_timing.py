"""Timing one batch that arrives at once, the same way for every engine (standard library only, so the
vLLM peer, which runs in its own venv without hyla, loads this file too).

Definitions, shared by every runner:
- TTFT: from the moment the batch is submitted to a request's first generated token;
- prefill time: from submission to the last request's first token (the whole batch prefilled);
- decode step: mean wall time of the steps that ran while every request of the batch was decoding
  (all had their first token, none had finished): `decode_timing = "steps"`. When no such step exists
  (prefill chunks of late requests overlapping the decode of early ones), the mean per request of
  (finish − first token) / (max_tokens − 1): `decode_timing = "per-request"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class BatchTiming:
    """Raw timings of one batch, in seconds from its submission."""

    ttft_s: list[float]
    prefill_s: float
    decode_step_s: float
    decode_timing: str
    total_s: float


def time_stepped(
    add_request: Callable[[str, list[int]], None], step: Callable[[], list[Any]],
    prompts: list[list[int]], max_tokens: int, tag: str = "bench",
) -> BatchTiming:
    """Submit `prompts` at once and step an engine until all finish.

    `step()` returns request outputs with `.request_id`, `.finished` and `.outputs[0].token_ids`
    (cumulative), as both hyla's and vLLM's engines do. Request ids are `{tag}-{i}`.
    """
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        add_request(request_id, prompt)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    decode_steps: list[float] = []
    while len(done) < len(ids):
        all_decoding = len(first) == len(ids) and not done
        t0 = time.perf_counter()
        outputs = step()
        t1 = time.perf_counter()
        if all_decoding:
            decode_steps.append(t1 - t0)
        for out in outputs:
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = t1 - start
            if out.finished:
                done[out.request_id] = t1 - start
    if decode_steps:
        decode, how = sum(decode_steps) / len(decode_steps), "steps"
    else:
        decode = sum((done[i] - first[i]) / max(max_tokens - 1, 1) for i in ids) / len(ids)
        how = "per-request"
    return BatchTiming(
        ttft_s=[first[i] for i in ids], prefill_s=max(first.values()), decode_step_s=decode,
        decode_timing=how, total_s=max(done.values()),
    )
