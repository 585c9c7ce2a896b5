"""One prompt in flight on the async engine, as both front ends see it.

`open()` submits and waits for the first output, so bad input, a full queue or a draining engine
surface as an `APIError` before any response is committed; iterating yields the engine's outputs (the first one
included) and records latency metrics; `aclose()` (also on cancellation) aborts the request, which
frees its KV blocks and state slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from hyla.runtime.async_engine import AsyncEngine, EngineOverloaded, EngineShutdown
from hyla.runtime.outputs import RequestOutput
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.errors import APIError, bad_request, overloaded, shutting_down
from hyla.serve.metrics import ServerMetrics


def as_bad_request(error: ValueError, param: str | None) -> APIError:
    message = str(error)
    return bad_request(message, param="max_tokens" if "max_tokens" in message else param)


class EngineRequest:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        param: str | None = "prompt",
    ) -> None:
        self.request_id = request_id
        self._stream = engine.generate(prompt, params, request_id)
        self._timer = metrics.timer()
        self._param = param
        self._first: RequestOutput | None = None

    async def open(self) -> RequestOutput:
        """Submit; raises `APIError` (400 bad input, 503 queue full) with nothing left behind."""
        try:
            self._first = await anext(self._stream)
        except ValueError as error:
            await self.aclose()
            raise as_bad_request(error, self._param) from None
        except EngineOverloaded as error:
            await self.aclose()
            raise overloaded(error.retry_after) from None
        except EngineShutdown:
            await self.aclose()
            raise shutting_down() from None
        except BaseException:
            await self.aclose()
            raise
        return self._first

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._first is None:
            await self.open()
        try:
            output = self._first
            self._observe(output)
            yield output
            async for output in self._stream:
                self._observe(output)
                yield output
        finally:
            await self.aclose()

    async def final(self) -> RequestOutput:
        """Run to the end; the last output holds the full text, ids and logprobs."""
        last = None
        async for last in self:
            pass
        return last

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _observe(self, output: RequestOutput) -> None:
        self._timer.advanced(max(len(c.token_ids_delta) for c in output.outputs))
        if output.finished:
            self._timer.finished([c.finish_reason for c in output.outputs])


async def open_all(requests: Sequence[EngineRequest]) -> None:
    """Open several requests at once; on any failure close them all and raise the first error."""
    results = await asyncio.gather(*(r.open() for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(r.aclose() for r in requests), return_exceptions=True)
        raise errors[0]


async def merged(requests: Sequence[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(request index, output) from several opened requests as they come; closing stops them all."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None | BaseException]] = asyncio.Queue()

    async def pump(i: int, request: EngineRequest) -> None:
        try:
            async for output in request:
                await queue.put((i, output))
            await queue.put((i, None))
        except Exception as error:  # handed to the consumer, which re-raises it
            await queue.put((i, error))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        pending = len(tasks)
        while pending:
            i, item = await queue.get()
            if item is None:
                pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.aclose() for r in requests), return_exceptions=True)
