"""`EngineThread`: the one thread a served engine is built on and stepped on.

On the CPU, every torch op that parallelises runs an OpenMP region on a thread team owned by the
calling thread. When one thread loads the model (making its team) and another then steps the
engine, the process keeps two teams on the same cores; libgomp then stops spinning between regions,
and every region waits for a futex wake-up. On two cores that made the SmolLM2 decode step take 25
ms instead of 17 under `hyla serve`. Doing all of the engine's work on one thread keeps one team.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    """A daemon thread that runs submitted calls one after another (a daemon, so that an interrupted
    start-up does not wait for a model load to finish)."""

    def __init__(self, name: str = "hyla-engine") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Queue `fn(*args, **kwargs)` on the thread; its result or exception arrives in the future."""
        future: Future[T] = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the thread and return its result (its exception raised here)."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Let the thread end once the calls queued before this one are done."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
