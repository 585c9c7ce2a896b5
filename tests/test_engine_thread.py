"""`EngineThread`: calls run on one thread in order, results and errors come back; a served engine is
built and stepped on the same thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.engine_thread import EngineThread
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher


def test_calls_run_in_order_on_one_other_thread_and_errors_come_back() -> None:
    thread = EngineThread()
    seen: list[tuple[int, int]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(5)]
    assert thread.call(threading.get_ident) == thread.ident != threading.get_ident()
    assert all(f.done() for f in futures) and [i for i, _ in seen] == list(range(5))
    assert {ident for _, ident in seen} == {thread.ident}
    with pytest.raises(ZeroDivisionError):
        thread.call(lambda: 1 / 0)
    assert thread.call(sum, [1, 2, 3]) == 6  # the thread outlives an error
    thread.close()
    thread._thread.join(10)
    assert not thread._thread.is_alive()


def test_a_served_engine_steps_on_the_thread_it_was_built_on() -> None:
    thread = EngineThread()
    config = EngineConfig(model="tiny", cache_memory="32MiB")
    engine = thread.call(lambda: LLMEngine(tiny_teacher("llama"), None, config))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    offline = LLMEngine(engine.model, None, config).generate([[5, 6, 7]], params)

    async def main() -> None:
        served = AsyncEngine(engine, thread=thread)
        await served.start()
        ids = [t async for out in served.generate([5, 6, 7], params) for t in out.outputs[0].token_ids_delta]
        assert ids == offline[0].outputs[0].token_ids
        queued = thread.submit(threading.get_ident)  # waits behind the stepping loop, which holds the thread
        await asyncio.sleep(0.2)
        assert not queued.done()
        await served.shutdown()
        assert queued.result(timeout=10) == thread.ident

    asyncio.run(main())
