"""Server-sent events and client disconnects: a streamed request stops when its client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hyla.serve.errors import APIError, internal_error

logger = logging.getLogger(__name__)

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def with_done(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Events for `chunks`, an error event if the stream fails midway, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except APIError as error:
        yield event(error.body())
    except Exception:
        logger.exception("stream failed")
        yield event(internal_error().body())
    finally:
        await chunks.aclose()
    yield DONE


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that watches for the client leaving and then closes the event source,
    whatever the ASGI server's spec version (the source's cleanup aborts the engine request)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watcher):
                task.cancel()
            await asyncio.gather(stream, watcher, return_exceptions=True)
            await self.body_iterator.aclose()
        failure = stream.exception() if stream.done() and not stream.cancelled() else None
        if failure is not None and not isinstance(failure, OSError):  # OSError: the client left
            raise failure


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first.

    Decided by which finished first, not by how `work` ended: a cancelled `asyncio.gather` ends with a
    `CancelledError` exception rather than in the cancelled state."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished = task.done()
        watcher.cancel()
        task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if not finished:
        raise ClientGone()
    return task.result()
