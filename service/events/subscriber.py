"""ZeroMQ SUB sockets that receive vLLM's live event frames ``[topic, seq, payload]``.

Two modes, usable together:
- bind: the service binds ``zmq.endpoint`` (plus port + r for data-parallel rank r) and
  engines connect to it; who sent a frame comes from its topic ``kv@<pod>@<model>``.
- connect: the service connects to each configured engine's PUB socket (rank r on port + r);
  the configured pod id names the sender, the topic (or the pod entry) the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

__all__ = ["Frame", "PodEndpoint", "Source", "Subscriber", "offset_port"]

log = structlog.get_logger("kv_cache.subscriber")

_DRAIN_MAX = 256
# After a wake-up, a socket rests this long before it is read again, so a steady stream is
# taken a few frames per loop wake-up rather than one (each wake-up costs the loop ~0.1 ms
# of asyncio and zmq.asyncio overhead); frames wait in ZeroMQ's queue meanwhile.
_REST_SECONDS = 0.001


@dataclass(frozen=True, slots=True)
class Source:
    """What the receiving socket knows about the sender."""

    pod_id: str | None = None
    model: str | None = None
    rank: int = 0
    replay_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One live frame, as received."""

    source: Source
    topic: bytes
    seq: int
    payload: bytes
    received: float


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """An engine the service connects to (connect mode)."""

    pod_id: str
    endpoint: str
    replay_endpoint: str | None = None
    model: str | None = None
    data_parallel_size: int = 1


def offset_port(endpoint: str, offset: int) -> str:
    """``tcp://host:5557`` + 2 -> ``tcp://host:5559``; the rank-r socket of an engine."""
    if offset == 0:
        return endpoint
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        raise ValueError(f"data parallel ranks need a tcp://host:port endpoint, got {endpoint!r}")
    return f"tcp://{host}:{int(port) + offset}"


class Subscriber:
    """Owns the SUB sockets and one reader task per socket; hands frames to ``sink``.

    ``on_bad_frame`` gets a reason for frames that are not ``[topic, seq(8 bytes), payload]``.
    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        *,
        topic_filter: str,
        sink: Callable[[Frame], None],
        on_bad_frame: Callable[[str], None],
    ) -> None:
        self._context = context
        self._topic = topic_filter.encode()
        self._sink = sink
        self._on_bad_frame = on_bad_frame
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self.bound: list[str] = []

    def bind(self, endpoint: str, data_parallel_size: int = 1) -> list[str]:
        """Bind ``endpoint`` and the next ranks' ports; returns the endpoints bound."""
        bound = []
        for rank in range(data_parallel_size):
            socket = self._socket()
            socket.bind(offset_port(endpoint, rank))
            last: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            bound.append(last)
            self._start(f"bind:{last}", socket, Source(rank=rank))
        self.bound.extend(bound)
        log.info("zmq bound", endpoints=bound, topic_filter=self._topic.decode())
        return bound

    def connect(self, pod: PodEndpoint) -> None:
        """Subscribe to an engine's PUB socket (every rank); replaces a previous entry."""
        self.disconnect(pod.pod_id)
        for rank in range(pod.data_parallel_size):
            replay = pod.replay_endpoint
            source = Source(
                pod.pod_id,
                pod.model,
                rank,
                offset_port(replay, rank) if replay else None,
            )
            socket = self._socket()
            socket.connect(offset_port(pod.endpoint, rank))
            self._start(pod.pod_id, socket, source)
        log.info(
            "zmq connected to pod",
            pod=pod.pod_id,
            endpoint=pod.endpoint,
            replay_endpoint=pod.replay_endpoint,
            data_parallel_size=pod.data_parallel_size,
        )

    def disconnect(self, pod_id: str) -> None:
        for task in self._tasks.pop(pod_id, []):
            task.cancel()

    async def close(self) -> None:
        tasks = [t for group in self._tasks.values() for t in group]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _socket(self) -> zmq.asyncio.Socket:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IPV6, 1)  # else a tcp://[::1] engine is never heard
        socket.setsockopt(zmq.SUBSCRIBE, self._topic)
        return socket

    def _start(self, key: str, socket: zmq.asyncio.Socket, source: Source) -> None:
        task = asyncio.create_task(self._read(socket, source), name=f"zmq-sub {key}")
        self._tasks.setdefault(key, []).append(task)

    async def _read(self, socket: zmq.asyncio.Socket, source: Source) -> None:
        # The same socket, synchronous: takes what else is already waiting without a loop
        # wake-up or a future per frame.
        waiting: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        try:
            while True:
                self._accept(await socket.recv_multipart(), source)
                for _ in range(_DRAIN_MAX):
                    try:
                        frames = waiting.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._accept(frames, source)
                await asyncio.sleep(_REST_SECONDS)
        finally:
            socket.close(linger=0)

    def _accept(self, frames: list[bytes], source: Source) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._on_bad_frame("bad_frame")
            return
        topic, seq, payload = frames
        self._sink(Frame(source, topic, int.from_bytes(seq, "big"), payload, time.time()))
