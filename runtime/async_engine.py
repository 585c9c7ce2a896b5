"""`AsyncEngine`: an asyncio front end that streams outputs while a background thread steps the engine.

Requests are validated in the caller (bad input raises `InvalidRequest` before anything is queued);
adds and aborts reach the engine thread through a command queue, outputs come back through one
asyncio queue per request. A consumer that stops early (cancelled task, `aclose()`) aborts its
request, which frees its KV blocks and state slot. A request the engine failed raises
`RequestFailed` in its stream while the others go on; if the engine thread dies, every stream and
every later call raises `EngineDead` and `wait_dead()` returns. The steps run on an `EngineThread`,
best the one the engine was built on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, replace

from hyla.runtime.engine import EngineStats, LLMEngine
from hyla.runtime.engine_thread import EngineThread
from hyla.runtime.errors import DuplicateRequestId, EngineDead, EngineOverloaded, EngineShutdown, RequestFailed
from hyla.runtime.outputs import CompletionOutput, RequestOutput, coalesced
from hyla.runtime.request import Request
from hyla.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Aborted:
    """Marker sent to a stream whose request was aborted before it finished."""

    request: Request

    def output(self) -> RequestOutput:
        r = self.request
        return RequestOutput(
            request_id=r.request_id, prompt=r.prompt, prompt_token_ids=list(r.prompt_token_ids),
            outputs=[CompletionOutput(index=i, finish_reason="abort") for i in range(r.params.n)],
            finished=True, metrics={"arrival": r.arrival},
        )


class AsyncEngine:
    """Runs `LLMEngine.step()` in a thread while there is work; streams deltas to async consumers (a
    consumer that falls behind gets the steps it missed joined into one output)."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 256, thread: EngineThread | None = None) -> None:
        """`thread`: where the steps run; pass the one the engine was built on (see `EngineThread`)."""
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending = 0  # adds sent but not yet taken by the engine thread
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._accepting = False
        self._stop = threading.Event()
        self._thread, self._own_thread = thread, thread is None
        self._running: Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: EngineDead | None = None
        self._dead: asyncio.Event | None = None
        self._stepping = False  # the engine thread owns the engine's state (under `_lock`)

    async def start(self) -> None:
        """Start stepping on the engine's thread (idempotent)."""
        if self._running is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._dead = asyncio.Event()
        self._accepting = True
        self._stop.clear()
        if self._thread is None:
            self._thread = EngineThread()
        self._running = self._thread.submit(self._run)

    async def shutdown(self, drain: bool = True) -> None:
        """Refuse new requests; with `drain` let in-flight ones finish, else abort them; stop the thread."""
        self._accepting = False
        if not drain:
            for request_id in list(self._streams):
                self._send(("abort", request_id))
        while self._running is not None and not self._running.done() and self._busy():
            await asyncio.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._running is not None:
            await asyncio.wrap_future(self._running)
            self._running = None
        if self._own_thread and self._thread is not None:
            self._thread.close()
            self._thread = None

    def _busy(self) -> bool:
        return bool(self._pending) or not self._commands.empty() or self.engine.has_unfinished_requests()

    @property
    def failure(self) -> EngineDead | None:
        """Why the engine died, once it has."""
        return self._error

    async def wait_dead(self) -> EngineDead:
        """Return (the error) once the engine thread has died."""
        await self._dead.wait()
        return self._error

    def _overloaded(self) -> bool:
        """More requests queued than the free sequence slots can take plus `max_waiting`."""
        running, waiting = self.engine.load()
        headroom = max(0, self.engine.max_num_seqs - running)
        return self._pending + waiting - headroom >= self.max_waiting

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (one per step that advanced it; the last has `finished=True`).

        Raises `InvalidRequest` for bad input, `EngineOverloaded` when the waiting queue is full and
        `EngineShutdown` while stopping, all before the first output; then `RequestFailed` if the
        engine failed this request and `EngineDead` if it died. Leaving the loop early aborts the request.
        """
        if self._error is not None:
            raise self._error
        if not self._accepting:
            raise EngineShutdown("the engine is not running (not started or shutting down)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise DuplicateRequestId(request_id)
        request = self.engine.make_request(request_id, prompt, params)
        if self._overloaded():
            raise EngineOverloaded(f"{self.max_waiting} requests are already waiting", retry_after=1.0)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        with self._lock:
            self._pending += 1
        self._send(("add", request))
        last: RequestOutput | None = None
        held: object | None = None  # taken from the queue while coalescing, handled next
        finished = False
        try:
            while not finished:
                if held is not None:
                    item, held = held, None
                else:
                    item = await stream.get()
                while isinstance(item, RequestOutput) and item.error is None and not item.finished and not stream.empty():
                    later = stream.get_nowait()  # a slow consumer: the steps it missed come as one output
                    if not isinstance(later, RequestOutput) or later.error is not None:
                        held = later
                        break
                    item = coalesced(item, later)
                if isinstance(item, BaseException):  # a late duplicate id, or the engine died
                    finished = True
                    raise item
                if isinstance(item, _Aborted):
                    finished = True
                    yield _aborted(last) if last is not None else item.output()
                    return
                if item.error is not None:
                    finished = True
                    raise RequestFailed(item.error)
                last, finished = item, item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with an output whose finish_reason is 'abort'."""
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """The engine's stats, read on the engine thread between two steps while it steps (this blocks
        until then: the event loop awaits `current_stats` instead)."""
        return self._stats().result()

    async def current_stats(self) -> EngineStats:
        """`stats`, awaited."""
        return await asyncio.wrap_future(self._stats())

    def _stats(self) -> Future:
        answer: Future = Future()
        with self._lock:
            if self._stepping:  # the cache index changes during a step: read it between steps
                self._send(("stats", answer))
                return answer
        self._answer(answer)
        return answer

    def _answer(self, answer: Future) -> None:
        try:
            answer.set_result(self.engine.stats())
        except Exception as exc:  # the asker sees it; the engine loop goes on
            answer.set_exception(exc)

    # ---- engine thread --------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)

    def _run(self) -> None:
        with self._lock:
            self._stepping = True
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # surface to every waiting consumer, then report the death
            logger.critical("the engine thread died", exc_info=exc)
            self._error = exc if isinstance(exc, EngineDead) else EngineDead(f"the engine thread died: {exc!r}")
            self._accepting = False
            for request_id in list(self._streams):
                self._deliver(request_id, self._error)
            self._loop.call_soon_threadsafe(self._dead.set)
        finally:
            with self._lock:
                self._stepping = False
            self._answer_stats()

    def _answer_stats(self) -> None:
        """Answer the stats requests still queued when the loop stops; other commands stay queued."""
        kept = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "stats":
                self._answer(command[1])
            else:
                kept.append(command)
        for command in kept:
            self._commands.put(command)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "stats":
                self._answer(arg)
            elif kind == "add":
                if arg.request_id in self._streams:
                    try:
                        self.engine.enqueue(arg)
                    except DuplicateRequestId as exc:
                        self._deliver(arg.request_id, exc)
                with self._lock:
                    self._pending -= 1
            elif arg in self.engine.requests:
                request = self.engine.requests[arg]
                self.engine.abort_request(arg)
                self._deliver(arg, _Aborted(request))


def _aborted(last: RequestOutput) -> RequestOutput:
    """The final output of an aborted request: nothing new, finish_reason 'abort' where unfinished."""
    outputs = [
        replace(c, text_delta="", token_ids_delta=[], finish_reason=c.finish_reason or "abort") for c in last.outputs
    ]
    return replace(last, outputs=outputs, finished=True)
