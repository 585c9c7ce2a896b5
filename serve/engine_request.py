"""One prompt in flight on the async engine, as both front ends see it.

`open()` submits and waits for the first output, so bad input, a full queue or a draining engine
surface as an `APIError` before any response is committed; iterating yields the engine's outputs (the first one
included) and records latency metrics; `aclose()` (also on cancellation) aborts the request, which
frees its KV blocks and state slots. An engine failure, before or after the first output, is logged,
counted and raised as a 500 `APIError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.errors import (
    DuplicateRequestId, EngineDead, EngineOverloaded, EngineShutdown, InvalidRequest, RequestFailed,
)
from hyla.runtime.outputs import RequestOutput
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.errors import (
    APIError, bad_request, drained, duplicate_request_id, engine_failed, overloaded, shutting_down,
)
from hyla.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineRequest:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        param: str = "prompt",
    ) -> None:
        self.request_id = request_id
        self._engine = engine
        self._stream = engine.generate(prompt, params, request_id)
        self._metrics = metrics
        self._timer = metrics.timer()
        self._param = param
        self._first: RequestOutput | None = None
        self._cut_off = False

    def _api_error(self, error: BaseException) -> APIError | None:
        """The client-facing error of an engine exception (logged and counted when the engine failed)."""
        if isinstance(error, DuplicateRequestId):
            return duplicate_request_id(str(error))
        if isinstance(error, InvalidRequest):
            return bad_request(str(error), param=self._param if error.param in (None, "prompt") else error.param)
        if isinstance(error, EngineOverloaded):
            return overloaded(error.retry_after)
        if isinstance(error, EngineShutdown):
            return shutting_down()
        if isinstance(error, (RequestFailed, EngineDead)):
            logger.error("request %s failed in the engine: %r", self.request_id, error, exc_info=error)
            self._metrics.failed.labels(type(error).__name__).inc()
            return engine_failed()
        return None

    async def open(self) -> RequestOutput:
        """Submit; raises `APIError` (400 bad input, 503 queue full, 500 engine failure) with nothing left behind."""
        try:
            self._first = await anext(self._stream)
        except BaseException as error:
            await self.aclose()
            mapped = self._api_error(error)
            if mapped is None:
                raise
            raise mapped from None
        return self._first

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._first is None:
            await self.open()
        try:
            yield self._observed(self._first)
            async for output in self._stream:
                yield self._observed(output)
        except (RequestFailed, EngineDead) as error:
            raise self._api_error(error) from None
        finally:
            await self.aclose()

    async def final(self) -> RequestOutput:
        """Run to the end; the last output holds the full text, ids and logprobs."""
        last = None
        async for last in self:
            pass
        return last

    async def cut_off(self) -> None:
        """Abort on shutdown: the consumer gets a `drained()` error instead of an aborted output."""
        self._cut_off = True
        await self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _observed(self, output: RequestOutput) -> RequestOutput:
        if self._cut_off and output.finished and any(c.finish_reason == "abort" for c in output.outputs):
            raise drained()
        self._timer.advanced(max(len(c.token_ids_delta) for c in output.outputs))
        if output.finished:
            self._timer.finished([c.finish_reason for c in output.outputs])
        return output


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
