"""Async scheduling (a decode step queued before the previous one's tokens reach the host) gives exactly
the outputs of synchronous stepping, for a teacher and a hybrid, with sampling, stops, n > 1, prompt
log-probabilities, preemption, aborts and prefix caching, and leaves only evictable cache behind.

It is on by default on CUDA only; here it runs on the CPU, where the same bookkeeping applies."""

from __future__ import annotations

import pytest

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import random_tokens as tokens, tiny_teacher

KINDS = ["teacher", "hybrid"]


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher("llama")
    return {"teacher": teacher, "hybrid": hybrid_from_teacher(teacher, ["gdn", "attention", "gla", "gdn"], seed=2)}


def engine(model, async_scheduling: bool, **kw) -> LLMEngine:
    config = {"cache_memory": "32MiB", "block_size": 16, "prefix_checkpoint_interval": 32, **kw}
    return LLMEngine(model, None, EngineConfig(model="tiny", async_scheduling=async_scheduling, **config))


def workload(stop_token: int) -> list[tuple[list[int], SamplingParams]]:
    return [
        (tokens(40, 1), SamplingParams(max_tokens=9, temperature=0, logprobs=2)),
        (tokens(5, 2), SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=7)),
        (tokens(70, 3), SamplingParams(max_tokens=7, temperature=1.0, top_k=20, seed=3, n=2)),
        (tokens(40, 1)[:33] + tokens(9, 4), SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1)),
        (tokens(18, 5), SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop_token])),
        (tokens(3, 6), SamplingParams(max_tokens=1, temperature=0)),
    ]


def summary(outputs) -> list:
    return [
        (o.request_id, o.prompt_logprobs, [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs])
        for o in outputs
    ]


def assert_clean(eng: LLMEngine) -> None:
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    assert eng._inflight is None
    cache = eng.scheduler.cache
    if cache.cache is not None:
        assert cache.blocks.num_used == len({p.block for p in cache.cache.points() if p.block is not None})


def run(model, async_scheduling: bool, waves, **kw):
    eng = engine(model, async_scheduling, **kw)
    outputs = []
    for wave in waves:
        outputs += eng.generate([p for p, _ in wave], [sp for _, sp in wave])
    assert_clean(eng)
    return eng, outputs


def stop_token_of(model) -> int:
    """A token the greedy continuation of request 4's prompt reaches after a few steps."""
    _, (out,) = run(model, False, [[(tokens(18, 5), SamplingParams(max_tokens=14, temperature=0))]])
    return out.outputs[0].token_ids[4]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("caching", [True, False])
def test_same_outputs_as_synchronous_stepping(models, kind, caching) -> None:
    model = models[kind]
    waves = [workload(stop_token_of(model))] * 2  # the second wave hits what the first cached
    _, sync = run(model, False, waves, enable_prefix_caching=caching)
    eng, queued = run(model, True, waves, enable_prefix_caching=caching)
    assert summary(queued) == summary(sync)
    assert any(c.finish_reason == "stop" for o in sync for c in o.outputs)


@pytest.mark.parametrize("kind", KINDS)
def test_preemption_under_a_tiny_pool(models, kind) -> None:
    model = models[kind]
    wave = [(tokens(30 + 7 * i, 10 + i), SamplingParams(max_tokens=20, temperature=0)) for i in range(4)]
    kw = {"cache_memory": "160KiB", "max_num_seqs": 4, "max_num_batched_tokens": 24, "max_model_len": 96}
    _, sync = run(model, False, [wave], **kw)
    eng, queued = run(model, True, [wave], **kw)
    assert eng.scheduler.num_preemptions > 0
    assert summary(queued) == summary(sync)


@pytest.mark.parametrize("kind", KINDS)
def test_abort_while_a_step_is_queued(models, kind) -> None:
    model = models[kind]
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = {f"r{i}": tokens(12 + i, 20 + i) for i in range(3)}
    eng = engine(model, True)
    for rid, prompt in prompts.items():
        eng.add_request(rid, prompt, params)
    outs: dict = {}
    queued_steps = 0
    for _ in range(5):
        for out in eng.step():
            outs[out.request_id] = out
        queued_steps += eng._inflight is not None
    assert queued_steps > 0  # decode steps really were queued ahead
    eng.abort_request("r1")
    while eng.has_unfinished_requests():
        for out in eng.step():
            outs[out.request_id] = out
    assert_clean(eng)
    sync = engine(model, False).generate([prompts["r0"], prompts["r2"]], params)
    assert [outs["r0"].outputs[0].token_ids, outs["r2"].outputs[0].token_ids] == [s.outputs[0].token_ids for s in sync]
