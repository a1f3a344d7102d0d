"""Composition root: builds every part from the settings, runs them, owns shutdown.

One asyncio loop runs the REST server (uvicorn), the gRPC server and the data plane's
control side; the native data plane ingests on threads of its own (service/dataplane/).
Shutdown on SIGTERM/SIGINT, in order: stop pod discovery, stop taking queries (in-flight
ones finish), stop receiving events, apply what is queued, stop background tasks; all within
``_STOP_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn
import zmq
import zmq.asyncio

from service.api.grpc_server import GrpcApi, grpc_address
from service.api.query import LocalityAnswer, QueryService
from service.api.rest import create_rest_app
from service.config import Settings
from service.dataplane import create_data_plane
from service.dataplane.native import NativeDataPlane
from service.events.subscriber import PodEndpoint
from service.logging import configure_logging
from service.prompts import PromptEncoders
from service.readiness import PYTHON_PLANE_WARNING, ServiceStatus
from service.telemetry import Metrics

if TYPE_CHECKING:
    from service.discovery import PodWatcher

__all__ = ["Service", "StartupError", "run"]

log = structlog.get_logger("kv_cache.app")

_STOP_SECONDS = 5.0


def run(settings: Settings) -> int:
    """Run the service until SIGTERM or SIGINT; returns the process exit code."""
    configure_logging(settings.logging.level, settings.logging.format)

    async def main() -> int:
        # Built inside the loop: grpc.aio and zmq.asyncio bind to the running loop.
        return await Service(settings).serve()

    try:
        return _event_loop_runner()(main())
    except (StartupError, OSError, zmq.ZMQError) as error:
        # A port in use, an endpoint that cannot bind, a backend not built: say so plainly.
        log.error("cannot start", error=str(error))
        return 1


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """``uvloop.run`` where uvloop is installed (not on Windows), else ``asyncio.run``.

    uvloop takes ~5-10% less CPU per query and per ingested batch than the default loop
    (docs/performance.md).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


class StartupError(Exception):
    """The settings ask for something this build cannot run."""


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Service:
    """Every part of a running kv-cache, wired together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        if settings.index.backend != "memory":
            raise StartupError(
                f"index.backend {settings.index.backend!r} is not built yet; use 'memory'"
            )
        self._zmq = zmq.asyncio.Context()
        self.plane = create_data_plane(settings, self.metrics, self._zmq)
        self.metrics.watch(self.plane)
        self.status = ServiceStatus(self.plane)
        self.discovery: PodWatcher | None = None
        if settings.discovery.enabled:
            # Imported only when used: the Kubernetes client alone is ~45 MiB of RSS.
            from service.discovery import PodWatcher

            self.discovery = PodWatcher(
                settings.discovery,
                self.plane,
                self.plane,
                reserved=[pod.pod_id for pod in settings.zmq.pods],
            )
        self.queries = QueryService(
            self.plane,
            max_tokens=settings.api.max_tokens,
            observe=self._observe_query,
            status=self.status,
            prompts=PromptEncoders(settings.models),
        )
        self.grpc = GrpcApi(self.queries, max_message_bytes=settings.api.max_body_bytes)
        rest = create_rest_app(
            self.queries, self.metrics.registry, max_body_bytes=settings.api.max_body_bytes
        )
        # With the native plane, native fronts own the HTTP and gRPC ports and the Python
        # servers listen behind them on private unix sockets.
        self._front = self.plane if isinstance(self.plane, NativeDataPlane) else None
        self._socket_dir = (
            tempfile.TemporaryDirectory(prefix="kv-cache-") if self._front is not None else None
        )
        where: dict[str, Any] = (
            {"uds": self._socket_path("http")}
            if self._socket_dir is not None
            else {"host": settings.api.host, "port": settings.api.port}
        )
        self._http_port: int | None = None
        self.http = _EmbeddedUvicorn(
            uvicorn.Config(
                rest,
                **where,
                log_config=None,
                access_log=False,
                lifespan="off",
                proxy_headers=False,  # nothing reads client addresses; one layer less per request
                timeout_graceful_shutdown=int(_STOP_SECONDS) - 1,
            )
        )
        self._stopping = asyncio.Event()

    def _socket_path(self, name: str) -> str:
        assert self._socket_dir is not None
        return f"{self._socket_dir.name}/{name}.sock"

    def _observe_query(self, api: str, seconds: float, answer: LocalityAnswer | None) -> None:
        if answer is None:
            self.metrics.observe_query(api, seconds, 0, 0)
            return
        locality = answer.locality
        self.metrics.observe_query(api, seconds, locality.total_blocks, locality.cache_hits)

    async def start(self) -> None:
        settings = self.settings
        bound: list[str] = []
        if settings.zmq.endpoint:
            bound = self.plane.bind(settings.zmq.endpoint, settings.zmq.data_parallel_size)
        for pod in settings.zmq.pods:
            self.plane.connect(
                PodEndpoint(
                    pod.pod_id,
                    pod.endpoint,
                    pod.replay_endpoint,
                    pod.model,
                    pod.data_parallel_size,
                )
            )
        await self.plane.start()
        if self.discovery is not None:
            self.discovery.start()
        grpc_port = await self._start_grpc()
        http_task = asyncio.create_task(self._serve_http(), name="http")
        while not self.http.started:
            if http_task.done():
                await http_task  # raises what stopped it (e.g. port in use)
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self._http_task = http_task
        if self._front is not None:
            api = settings.api
            self._http_port = self._front.serve_http(
                api.host,
                api.port,
                self._socket_path("http"),
                max_body_bytes=api.max_body_bytes,
                max_tokens=api.max_tokens,
            )
            self.metrics.watch_native_queries("rest", self._front.http_counts)
        # Start-up objects (modules, schemas, routes) never die: moving them out of the
        # collector's sight turns 70-140 ms full collections into sub-millisecond ones.
        gc.collect()
        gc.freeze()
        self.status.started = True
        await self.grpc.set_serving(True)
        log.info(
            "kv-cache started",
            http=f"{settings.api.host}:{self.http_port}",
            grpc=f"{settings.grpc.host}:{grpc_port}",
            zmq_bound=bound,
            zmq_pods=[p.pod_id for p in settings.zmq.pods],
            discovery=settings.discovery.enabled,
            index_backend=settings.index.backend,
            data_plane=self.plane.kind,
            event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        if self.plane.kind == "python":
            log.warning("python data plane", detail=PYTHON_PLANE_WARNING)

    async def _start_grpc(self) -> int:
        """The gRPC server; with the native plane, behind the native front (the front owns
        the port and answers the hot path; the Python server serves the rest on a private
        socket)."""
        settings = self.settings
        if self._front is None:
            return await self.grpc.start(settings.grpc.host, settings.grpc.port)
        backend = f"unix:{self._socket_path('grpc')}"
        await self.grpc.start_at(backend)
        port = self._front.serve_grpc(
            grpc_address(settings.grpc.host, settings.grpc.port),
            backend,
            max_message_bytes=settings.api.max_body_bytes,
            max_tokens=settings.api.max_tokens,
        )
        self.metrics.watch_native_queries("grpc", self._front.grpc_counts)
        return port

    async def _serve_http(self) -> None:
        try:
            await self.http.serve()
        except SystemExit:
            # uvicorn logs why (e.g. the port is in use) and exits; an exit inside a task
            # would escape the event loop past the ordered shutdown.
            api = self.settings.api
            raise StartupError(f"cannot serve HTTP on {api.host}:{api.port}") from None

    @property
    def http_port(self) -> int:
        if self._http_port is not None:
            return self._http_port
        port: int = self.http.servers[0].sockets[0].getsockname()[1]
        return port

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self.start()
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()
        log.info("stopped")
        return 0

    async def stop(self) -> None:
        """Ordered shutdown; safe to call after a failed start."""
        if self.discovery is not None:
            await self.discovery.stop()
        self.status.stopping = True
        with contextlib.suppress(Exception):
            await self.grpc.set_serving(False)
        http_task = getattr(self, "_http_task", None)
        stopping: list[Awaitable[object]] = [self.grpc.stop(grace=_STOP_SECONDS - 2)]
        if http_task is not None:
            stopping.append(http_task)
        if self._front is not None:
            # Off the event loop, so the Python servers behind the fronts stop meanwhile:
            # they finish the relayed calls in flight and close the idle relayed
            # connections, which a front would otherwise wait out to the end of the grace.
            stopping.append(asyncio.to_thread(self._front.stop_http, _STOP_SECONDS - 2))
            stopping.append(asyncio.to_thread(self._front.stop_grpc, _STOP_SECONDS - 2))
        self.http.should_exit = True
        await asyncio.gather(*stopping, return_exceptions=True)
        if self._socket_dir is not None:
            self._socket_dir.cleanup()
        await self.plane.stop()
        self._zmq.term()
