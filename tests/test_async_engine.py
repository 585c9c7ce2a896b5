"""The asyncio front end: streaming, cancellation frees the cache, overload, abort and draining shutdown."""

from __future__ import annotations

import asyncio

import pytest

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.errors import EngineOverloaded
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.engine_thread import EngineThread
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return hybrid_from_teacher(tiny_teacher("llama"), ["gdn", "attention", "gla", "gdn"], seed=1)


def make(model, max_waiting: int = 256, **kw) -> AsyncEngine:
    return AsyncEngine(LLMEngine(model, None, EngineConfig(model="tiny", cache_memory="32MiB", **kw)), max_waiting)


async def wait_free(engine: AsyncEngine, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        s = engine.stats()
        if (s.kv_blocks_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"cache not freed: {engine.stats()}")


def test_streams_deltas_equal_to_offline_output(model) -> None:
    prompts = [[5, 6, 7, 8], list(range(3, 40))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    offline = LLMEngine(model, None, EngineConfig(model="tiny", cache_memory="32MiB")).generate(prompts, params)

    async def consume(engine: AsyncEngine, prompt: list[int]) -> tuple[list[int], list]:
        ids, outs = [], []
        async for out in engine.generate(prompt, params):
            ids += out.outputs[0].token_ids_delta
            outs.append(out)
        return ids, outs

    async def main() -> None:
        engine = make(model)
        await engine.start()
        results = await asyncio.gather(*(consume(engine, p) for p in prompts))
        for (ids, outs), ref in zip(results, offline):
            assert ids == ref.outputs[0].token_ids == outs[-1].outputs[0].token_ids
            assert outs[-1].finished and not any(o.finished for o in outs[:-1]) and len(outs) > 1
        await engine.shutdown()
        await wait_free(engine)

    asyncio.run(main())


def test_cancelled_consumers_free_the_cache(model) -> None:
    async def main() -> None:
        engine = make(model)
        await engine.start()
        stream = engine.generate([5, 6, 7], LONG)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()  # client disconnect
        await wait_free(engine)

        async def consume() -> None:
            async for _ in engine.generate(list(range(3, 30)), LONG):
                pass

        task = asyncio.create_task(consume())
        while engine.stats().state_slots_used == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_free(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_bad_input_overload_and_abort(model) -> None:
    async def main() -> None:
        engine = make(model, max_waiting=2, max_num_seqs=1)
        await engine.start()
        with pytest.raises(ValueError, match="empty"):
            await engine.generate([], LONG).__anext__()
        running = engine.generate([5, 6], LONG, request_id="first")
        await running.__anext__()  # admitted and decoding; it holds the only slot
        waiting = [engine.generate([7, 8], LONG, request_id=f"w{i}") for i in range(2)]
        tasks = [asyncio.create_task(w.__anext__()) for w in waiting]
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloaded) as info:
            await engine.generate([9], LONG).__anext__()
        assert info.value.retry_after > 0
        await engine.abort("first")
        last = None
        async for out in running:
            last = out
        assert last.finished and last.outputs[0].finish_reason == "abort"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in waiting:
            await w.aclose()
        await wait_free(engine)
        await engine.shutdown(drain=False)

    asyncio.run(main())


def test_shutdown_drains_in_flight_requests(model) -> None:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    async def consume(engine: AsyncEngine, prompt: list[int]):
        last = None
        async for out in engine.generate(prompt, params):
            last = out
        return last

    async def main() -> None:
        engine = make(model)
        await engine.start()
        tasks = [asyncio.create_task(consume(engine, [5 + i, 6, 7])) for i in range(3)]
        await asyncio.sleep(0)  # let the requests be queued
        await asyncio.sleep(0.01)
        await engine.shutdown(drain=True)
        finals = await asyncio.gather(*tasks)
        assert all(f.finished and len(f.outputs[0].token_ids) == 20 for f in finals)
        with pytest.raises(RuntimeError):
            await engine.generate([5], params).__anext__()
        await wait_free(engine)

    asyncio.run(main())


def test_stats_are_read_on_the_engine_thread_while_it_steps(model, monkeypatch) -> None:
    """The cache index changes during a step, so stats asked for while requests run (awaited on
    the event loop, or blocking from another thread) are read on the engine thread between steps;
    once it stops, on the caller's."""
    import threading

    readers: list[int] = []
    stats = LLMEngine.stats
    monkeypatch.setattr(LLMEngine, "stats", lambda self: readers.append(threading.get_ident()) or stats(self))

    thread = EngineThread()

    async def main() -> None:
        engine = AsyncEngine(LLMEngine(model, None, EngineConfig(model="tiny", cache_memory="32MiB")), thread=thread)
        await engine.start()
        task = asyncio.create_task(consume_all(engine.generate(list(range(3, 30)), LONG)))
        while not engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        stepping = engine.engine.load()
        from_loop = await engine.current_stats()
        from_thread = await asyncio.to_thread(engine.stats)
        assert stepping[0] + stepping[1] == 1 and from_loop.num_running + from_loop.num_waiting == 1
        assert from_thread.kv_blocks_total == from_loop.kv_blocks_total
        await task
        await engine.shutdown()

    async def consume_all(stream) -> None:
        async for _ in stream:
            pass

    readers.clear()
    asyncio.run(main())
    assert len(readers) >= 2 and set(readers[:2]) == {thread.ident}
    thread.close()
    readers.clear()
    idle = make(model)
    idle.stats()
    assert readers == [threading.get_ident()]


def test_a_slow_consumer_gets_the_steps_it_missed_as_one_output(model) -> None:
    """While a consumer is busy, the engine's outputs wait in its queue; the next read joins them:
    fewer outputs than steps, and the joined deltas are exactly the generated tokens and text."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    offline = LLMEngine(model, None, EngineConfig(model="tiny", cache_memory="32MiB")).generate([[5, 6, 7]], params)[0]

    async def main() -> list:
        engine = make(model)
        await engine.start()
        outs = []
        async for out in engine.generate([5, 6, 7], params):
            outs.append(out)
            await asyncio.sleep(0.05)  # a client reading slowly
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    ids = [t for o in outs for t in o.outputs[0].token_ids_delta]
    assert ids == offline.outputs[0].token_ids == outs[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].text_delta for o in outs) == outs[-1].outputs[0].text
    assert len(outs[-1].outputs[0].logprobs) == 24
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert 1 < len(outs) < 24 and max(len(o.outputs[0].token_ids_delta) for o in outs) > 1
