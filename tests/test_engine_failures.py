"""Requests that once killed the engine, and failures inside a step: only the requests concerned
fail, their cache is freed and the engine carries on; a device fault ends the engine loudly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.errors import EngineDead, InvalidRequest, RequestFailed
from hyla.runtime.sampling_params import SamplingParams
from tests.test_engine import GREEDY, assert_all_free, engine, hf_greedy
from tests.tiny_models import tiny_teacher

POISON = 13  # token id whose embedding lookup the fault-injection hook rejects


@pytest.fixture(scope="module")
def model():
    return hybrid_from_teacher(tiny_teacher("llama"), ["gdn", "attention", "gla", "gdn"], seed=1)


def poison(model, error: type[Exception] = RuntimeError):
    """A forward pre-hook that raises `error` whenever the batch contains `POISON`."""

    def hook(module, args):
        if bool((args[0] == POISON).any()):
            raise error("injected fault")

    return model.model.embed_tokens.register_forward_pre_hook(hook)


def run(eng) -> list:
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    return outs


def test_former_engine_killers_just_work(model) -> None:
    eng = engine(model)
    cases = {
        "huge-seed": SamplingParams(seed=18446744073709551615, n=2, temperature=1, max_tokens=4),
        "negative-seed": SamplingParams(seed=-(2**70), temperature=1, max_tokens=4),
        "tiny-temperature": SamplingParams(temperature=1e-40, max_tokens=4),
        "subnormal-temperature": SamplingParams(temperature=5e-324, max_tokens=4),
    }
    for request_id, params in cases.items():
        eng.add_request(request_id, [5, 6, 7], params)
    outs = {o.request_id: o for o in run(eng) if o.finished}
    assert set(outs) == set(cases) and all(o.error is None for o in outs.values())
    assert len(outs["huge-seed"].outputs) == 2 and all(len(c.token_ids) == 4 for c in outs["huge-seed"].outputs)
    greedy = hf_greedy(model, [5, 6, 7], 4)
    assert outs["tiny-temperature"].outputs[0].token_ids == greedy
    assert outs["subnormal-temperature"].outputs[0].token_ids == greedy
    assert_all_free(eng)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InvalidRequest) as info:
            SamplingParams(temperature=bad)
        assert info.value.param == "temperature"


def test_a_failing_step_fails_its_requests_and_the_engine_carries_on(model) -> None:
    eng = engine(model)
    handle = poison(model)
    try:
        eng.add_request("bad", [5, POISON, 7], GREEDY)
        outs = run(eng)
        assert [o.request_id for o in outs] == ["bad"] and outs[0].finished
        assert "injected fault" in outs[0].error and outs[0].outputs[0].finish_reason == "abort"
        assert_all_free(eng)
        eng.add_request("good", [5, 6, 7], GREEDY)  # the engine still serves, from a clean cache
        good = [o for o in run(eng) if o.finished]
        assert good[0].error is None and good[0].outputs[0].token_ids == hf_greedy(model, [5, 6, 7], 10)
        assert_all_free(eng)
    finally:
        handle.remove()


def test_async_engine_reports_failed_requests_and_dies_on_device_faults(model) -> None:
    async def main() -> None:
        eng = AsyncEngine(engine(model))
        await eng.start()
        handle = poison(model)
        try:
            with pytest.raises(RequestFailed, match="injected fault"):
                async for _ in eng.generate([POISON, 5], GREEDY):
                    pass
            outs = [o async for o in eng.generate([5, 6, 7], GREEDY)]
            assert outs[-1].outputs[0].token_ids == hf_greedy(model, [5, 6, 7], 10)
            handle.remove()
            handle = poison(model, torch.AcceleratorError)
            with pytest.raises(EngineDead):
                async for _ in eng.generate([POISON, 5], GREEDY):
                    pass
            assert isinstance(await asyncio.wait_for(eng.wait_dead(), 5), EngineDead)
            assert isinstance(eng.failure, EngineDead)
            with pytest.raises(EngineDead):
                await eng.generate([5, 6], GREEDY).__anext__()
        finally:
            handle.remove()
            await eng.shutdown(drain=False)

    asyncio.run(main())
