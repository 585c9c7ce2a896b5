"""`ServerThread`: a `HylaServer` on its own event loop in a background thread.

For embedding a server in another program (tests, notebooks, load generators) without a
subprocess:

    with ServerThread(engine, ServerSettings("tiny", port=0, grpc_port=0)) as server:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")...

On the CPU, build the engine on an `EngineThread` and pass that thread too (`thread.call(
LLMEngine.from_config, config)`), so that it steps where it was built (see `hyla.runtime.engine_thread`).
"""

from __future__ import annotations

import asyncio
import threading

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_thread import EngineThread
from hyla.serve.app import HylaServer, ServerSettings


class ServerThread:
    def __init__(self, engine: LLMEngine, settings: ServerSettings, thread: EngineThread | None = None) -> None:
        self.server = HylaServer(engine, settings, thread)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="hyla-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.server.settings.host}:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.server.settings.host}:{self.server.grpc_port}"

    def _main(self) -> None:
        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as error:
                self._error = error
                raise
            finally:
                self._ready.set()
            await self.server.wait_closed()

        try:
            asyncio.run(main())
        except BaseException as error:  # reported by start() or stop()
            self._error = self._error or error

    def start(self, timeout: float = 60) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self

    def wait_stopped(self, timeout: float = 60) -> None:
        """Wait for the server to stop by itself (e.g. after its engine died; see `server.failure`)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout} s")

    def stop(self, timeout: float = 60) -> None:
        """Drain and stop; raises if the server thread failed."""
        self.server.request_shutdown()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout} s")
        if self._error is not None:
            raise RuntimeError("the server thread failed") from self._error

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
