"""Fetch missed batches from a vLLM engine's replay socket (ROUTER) with a DEALER.

Request: ``[b"", start_seq (8 bytes, big-endian)]``. Replies: every buffered batch with
``seq >= start_seq`` as ``[b"", seq, payload]`` (vLLM <= 0.25) or
``[b"", topic, seq, payload]`` (0.26+), then the end marker: seq ``0xFFFFFFFFFFFFFFFF`` with
an empty payload.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq
import zmq.asyncio

__all__ = ["END_SEQ", "ReplayError", "ReplayedBatch", "Replayer"]

END_SEQ = 0xFFFF_FFFF_FFFF_FFFF


class ReplayError(Exception):
    """A replay that did not complete; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReplayedBatch:
    seq: int
    payload: bytes


class Replayer:
    """Asks replay endpoints for batches; one short-lived DEALER per request.

    ``timeout`` bounds the wait for each reply frame, so a long replay that keeps arriving
    is not cut off, and a silent or absent engine fails fast. ``max_batches`` bounds memory:
    vLLM buffers at most ``buffer_steps`` (10000 by default) batches.
    """

    def __init__(
        self, context: zmq.asyncio.Context, *, timeout: float, max_batches: int = 20_000
    ) -> None:
        self._context = context
        self._timeout_ms = max(1, int(timeout * 1000))
        self._max_batches = max_batches

    async def fetch(self, endpoint: str, start_seq: int) -> list[ReplayedBatch]:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IPV6, 1)
        try:
            socket.connect(endpoint)
            await socket.send_multipart([b"", start_seq.to_bytes(8, "big")])
            batches: list[ReplayedBatch] = []
            while True:
                if not await socket.poll(self._timeout_ms):
                    raise ReplayError(
                        "timeout", f"{endpoint} sent nothing for {self._timeout_ms} ms"
                    )
                frames = await socket.recv_multipart()
                seq, payload = _parse_reply(endpoint, frames)
                if seq == END_SEQ:
                    return batches
                batches.append(ReplayedBatch(seq, payload))
                if len(batches) > self._max_batches:
                    raise ReplayError("too_long", f"{endpoint} sent over {self._max_batches}")
        except zmq.ZMQError as error:
            raise ReplayError("socket", f"{endpoint}: {error}") from error
        finally:
            socket.close(linger=0)


def _parse_reply(endpoint: str, frames: list[bytes]) -> tuple[int, bytes]:
    if len(frames) == 3 and not frames[0]:
        seq, payload = frames[1], frames[2]
    elif len(frames) == 4 and not frames[0]:
        seq, payload = frames[2], frames[3]
    else:
        raise ReplayError("bad_frame", f"{endpoint} sent a {len(frames)}-frame reply")
    if len(seq) != 8:
        raise ReplayError("bad_frame", f"{endpoint} sent a {len(seq)}-byte sequence number")
    return int.from_bytes(seq, "big"), payload
