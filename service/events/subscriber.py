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
from typing import Any

import structlog
import zmq
import zmq.asyncio

__all__ = ["Frame", "PodEndpoint", "Source", "Subscriber", "offset_port"]

log = structlog.get_logger("kv_cache.subscriber")

# Frames taken from one socket per round, so one busy engine cannot hold up the others.
_DRAIN_MAX = 256
# Between rounds that found frames the reader rests this long, so a steady stream is taken
# a few frames per loop wake-up rather than one (a wake-up through zmq.asyncio costs the
# loop ~30 us); frames wait in ZeroMQ's queue meanwhile.
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


class _Reader:
    """One SUB socket, its synchronous twin for non-blocking drains, and who sends on it."""

    __slots__ = ("socket", "source", "sync")

    def __init__(self, socket: zmq.asyncio.Socket, source: Source) -> None:
        self.socket = socket
        # The same socket, synchronous: drains without a future or a loop wake-up per frame.
        self.sync: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        self.source = source


class Subscriber:
    """Owns the SUB sockets and one task that reads them all; hands frames to ``sink``.

    The task drains every socket without blocking, rests ``_REST_SECONDS`` and drains again
    while frames keep coming; when a round finds none it waits until any socket is readable.
    A steady stream so costs one loop wake-up per rest, whatever the number of engines,
    rather than one per frame per engine.

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
        self._readers: dict[str, list[_Reader]] = {}
        self._retired: list[_Reader] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.bound: list[str] = []

    def bind(self, endpoint: str, data_parallel_size: int = 1) -> list[str]:
        """Bind ``endpoint`` and the next ranks' ports; returns the endpoints bound."""
        bound = []
        for rank in range(data_parallel_size):
            socket = self._socket()
            try:
                socket.bind(offset_port(endpoint, rank))
            except BaseException:
                socket.close(linger=0)
                raise
            last: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            bound.append(last)
            self._add(f"bind:{last}", _Reader(socket, Source(rank=rank)))
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
            self._add(pod.pod_id, _Reader(socket, source))
        log.info(
            "zmq connected to pod",
            pod=pod.pod_id,
            endpoint=pod.endpoint,
            replay_endpoint=pod.replay_endpoint,
            data_parallel_size=pod.data_parallel_size,
        )

    def disconnect(self, pod_id: str) -> None:
        readers = self._readers.pop(pod_id, [])
        if readers:
            # Closed by the reader task, which may be waiting on them right now.
            self._retired.extend(readers)
            self._changed.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for readers in self._readers.values():
            self._retired.extend(readers)
        self._readers.clear()
        self._close_retired()

    def _socket(self) -> zmq.asyncio.Socket:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IPV6, 1)  # else a tcp://[::1] engine is never heard
        socket.setsockopt(zmq.SUBSCRIBE, self._topic)
        return socket

    def _add(self, key: str, reader: _Reader) -> None:
        self._readers.setdefault(key, []).append(reader)
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._read(), name="zmq-sub")

    def _close_retired(self) -> None:
        for reader in self._retired:
            reader.socket.close(linger=0)
        self._retired.clear()

    async def _read(self) -> None:
        while True:
            self._close_retired()
            if self._drain():
                await asyncio.sleep(_REST_SECONDS)
            else:
                await self._until_readable()

    def _drain(self) -> int:
        """Takes what is waiting on every socket, up to ``_DRAIN_MAX`` frames each."""
        taken = 0
        for readers in list(self._readers.values()):
            for reader in readers:
                receive, source = reader.sync.recv_multipart, reader.source
                for _ in range(_DRAIN_MAX):
                    try:
                        frames = receive(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._accept(frames, source)
                    taken += 1
        return taken

    async def _until_readable(self) -> None:
        """Returns once any socket is readable, or the set of sockets changed."""
        self._changed.clear()
        poller = zmq.asyncio.Poller()
        for readers in self._readers.values():
            for reader in readers:
                poller.register(reader.socket, zmq.POLLIN)
        changed = asyncio.ensure_future(self._changed.wait())
        waits: set[asyncio.Future[Any]] = {changed}
        if poller.sockets:
            waits.add(asyncio.ensure_future(poller.poll()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _accept(self, frames: list[bytes], source: Source) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._on_bad_frame("bad_frame")
            return
        topic, seq, payload = frames
        self._sink(Frame(source, topic, int.from_bytes(seq, "big"), payload, time.time()))
