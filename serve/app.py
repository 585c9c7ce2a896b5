"""`HylaServer`: one async engine behind the HTTP and gRPC front ends, in one process and event loop.

SIGTERM / SIGINT drain: both front ends stop taking requests (HTTP closes its listener and answers
503 on kept-alive connections, gRPC refuses new calls and reports NOT_SERVING), in-flight requests
finish (up to `drain_timeout` seconds; requests still running then are answered with a
`shutting_down` error), then the engine shuts down and the process exits 0.

If the engine dies, `/health` answers 503 and gRPC health reports NOT_SERVING for `DEAD_LINGER` seconds
(probes and load balancers see why), then the server drains as above; `failure` holds the engine's
error and the CLI exits non-zero, for a supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn

from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.engine_thread import EngineThread
from hyla.runtime.engine import LLMEngine
from hyla.serve.grpc_server import GrpcFrontEnd
from hyla.serve.http_app import DEFAULT_MAX_BODY_BYTES, build_app
from hyla.serve.http_guards import HostPolicy
from hyla.serve.served_model import DEFAULT_MAX_REQUEST_TOKENS, ServedModel

logger = logging.getLogger(__name__)
CUT_OFF_GRACE = 5.0  # seconds the front ends wait past drain_timeout for cut-off requests to answer
DEAD_LINGER = 1.0  # seconds a server with a dead engine reports unhealthy before it drains and exits


@dataclass
class ServerSettings:
    """Where and how to serve; ports 0 pick free ones, `grpc_port` None disables gRPC. HTTP takes loopback
    Host headers, the bound host's and `allowed_hosts` ("*": any)."""

    model_name: str
    model_aliases: tuple[str, ...] = ()  # other names requests may use (e.g. the model's path)
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 50051
    api_key: str | None = None
    metrics_auth: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_waiting: int = 256
    drain_timeout: float = 30.0
    log_level: str = "info"


class _Uvicorn(uvicorn.Server):
    """uvicorn that tells us when a shutdown starts, and leaves the process alive afterwards
    (uvicorn re-raises the signal once it is done, which would skip the gRPC and engine drain)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: object) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listener whose protocol is set, so asyncio turns on TCP_NODELAY for accepted connections
    (`socket.create_server` leaves it 0, and small responses then wait for delayed ACKs)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class HylaServer:
    """Build with an engine and settings; `await run()` serves until a signal or `request_shutdown()`."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings, thread: EngineThread | None = None) -> None:
        """`thread`: the one `engine` was built on, to step it there too (a new one when None)."""
        self.settings = settings
        self.engine = AsyncEngine(engine, max_waiting=settings.max_waiting, thread=thread)
        self.served = ServedModel(self.engine, settings.model_name, settings.max_request_tokens, settings.model_aliases)
        hosts = HostPolicy(settings.host, settings.allowed_hosts)
        self.app = build_app(self.served, settings.api_key, settings.max_body_bytes, hosts, settings.metrics_auth)
        self.grpc: GrpcFrontEnd | None = None  # grpc.aio binds to the loop it is made in: made in start()
        config = uvicorn.Config(
            self.app, log_level=settings.log_level, lifespan="off",
            timeout_graceful_shutdown=int(settings.drain_timeout + CUT_OFF_GRACE), timeout_keep_alive=5,
        )
        self.http = _Uvicorn(config, on_exit=self.request_shutdown)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc_stop: asyncio.Task | None = None
        self._http_task: asyncio.Task | None = None
        self._cut_off: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the engine and bind both front ends (ports known afterwards)."""
        self._loop = asyncio.get_running_loop()
        await self.engine.start()
        self._watcher = asyncio.create_task(self._watch_engine())
        sock = listening_socket(self.settings.host, self.settings.port)
        self.http_port = sock.getsockname()[1]
        if self.settings.grpc_port is not None:
            self.grpc = GrpcFrontEnd(self.served, self.settings.api_key)
            self.grpc_port = await self.grpc.start(self.settings.host, self.settings.grpc_port)
        self._http_task = asyncio.create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)

    def request_shutdown(self) -> None:
        """Begin draining; safe to call from any thread or a signal handler, more than once."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self.served.accepting = False
        self.http.should_exit = True
        if self._cut_off is None:
            self._cut_off = self._loop.call_later(
                self.settings.drain_timeout, lambda: asyncio.ensure_future(self.served.cut_off())
            )
        if self.grpc is not None and self._grpc_stop is None:
            self._grpc_stop = asyncio.ensure_future(self.grpc.stop(self.settings.drain_timeout + CUT_OFF_GRACE))

    async def _watch_engine(self) -> None:
        """When the engine dies: report unhealthy on both front ends, log it, drain and exit."""
        error = await self.engine.wait_dead()
        logger.error("the engine died; reporting unhealthy and shutting down: %r", error, exc_info=error)
        self.failure = error
        self.served.alive = False
        if self.grpc is not None:
            await self.grpc.not_serving()
        await asyncio.sleep(DEAD_LINGER)
        self._begin_drain()

    async def wait_closed(self) -> None:
        """Wait for a shutdown request to finish draining, then stop the engine (see `failure`)."""
        await self._http_task
        self._begin_drain()
        if self._grpc_stop is not None:
            await self._grpc_stop
        self._cut_off.cancel()
        if not self._watcher.done():
            self._watcher.cancel()
        await self.engine.shutdown(drain=True)

    async def run(self) -> None:
        await self.start()
        await self.wait_closed()
