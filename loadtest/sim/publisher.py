"""A vLLM engine's KV-event sockets: a PUB for live batches and a ROUTER for replays.

As vLLM's ``ZmqEventPublisher`` does: live frames ``[topic, seq (8 bytes, big-endian),
payload]`` with ``seq`` counting from 0, the payload msgpack-encoded exactly as the chosen
release writes it (``tests.support.vllm_wire``), and the last ``buffer_steps`` batches
kept for replay: a DEALER sends ``[b"", start_seq]`` and gets every buffered batch with
``seq >= start_seq`` as ``[b"", topic, seq, payload]`` (vLLM 0.26+), then ``seq`` =
``0xFFFFFFFFFFFFFFFF`` with an empty payload.

Both sockets bind on 127.0.0.1 (free ports); the daemon connects to them (connect mode).
The PUB is an XPUB, which is a PUB to subscribers, so the simulator can wait for the
daemon's subscription instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from tests.support.vllm_wire import Version, WireEvent, encode_batch

__all__ = ["END_SEQ", "EventPublisher"]

END_SEQ = b"\xff" * 8


class EventPublisher:
    """One engine's PUB and replay ROUTER; the topic names the pod and the model."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        pod_id: str,
        *,
        version: Version = "0.33",
        buffer_steps: int = 10_000,
    ) -> None:
        self.pod_id = pod_id
        self.version: Version = version
        self.seq = 0
        self.replays = 0
        self._buffer: deque[tuple[bytes, bytes, bytes]] = deque(maxlen=buffer_steps)
        self._pub = context.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._pub.bind("tcp://127.0.0.1:*")
        self._router = context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind("tcp://127.0.0.1:*")
        self.endpoint = _bound(self._pub)
        self.replay_endpoint = _bound(self._router)
        self._replay_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start answering replay requests (needs a running event loop)."""
        if self._replay_task is None:
            self._replay_task = asyncio.create_task(self._serve_replays(), name="replay")

    async def wait_subscribed(self) -> None:
        """Wait until a subscriber (the daemon) has subscribed to this PUB; callers bound
        the wait with ``asyncio.timeout``."""
        await self._pub.recv()

    async def publish(self, model: str, events: Sequence[WireEvent]) -> int:
        """Encode one batch as ``version`` does, send it, keep it for replay; its seq."""
        topic = f"kv@{self.pod_id}@{model}".encode()
        payload = encode_batch(events, ts=time.time(), dp_rank=0, version=self.version)
        seq = self.seq.to_bytes(8, "big")
        self._buffer.append((topic, seq, payload))
        await self._pub.send_multipart([topic, seq, payload])
        self.seq += 1
        return self.seq - 1

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        self._pub.close(linger=0)
        self._router.close(linger=0)

    async def _serve_replays(self) -> None:
        router = self._router
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
                continue  # not a replay request: ignore it, as vLLM does
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            self.replays += 1
            end_topic = f"kv@{self.pod_id}@".encode()
            for topic, seq, payload in list(self._buffer):
                if int.from_bytes(seq, "big") >= start:
                    await router.send_multipart([identity, b"", topic, seq, payload])
                end_topic = topic
            await router.send_multipart([identity, b"", end_topic, END_SEQ, b""])


def _bound(socket: zmq.asyncio.Socket) -> str:
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()
