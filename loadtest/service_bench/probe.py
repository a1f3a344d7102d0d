"""The marker probe of event-to-visible lag: a ninth engine publishes one new block at a
time and a raw HTTP client polls ``/v1/locality`` until a pod holds it."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import zmq

from loadtest.service_bench.clients import RawHttp
from loadtest.service_bench.metrics import quantile
from loadtest.service_bench.progress import Progress
from loadtest.service_bench.results import Probes
from loadtest.service_bench.workload import (
    MARKER_HASH_BASE,
    MODEL,
    PROBE_POD,
    encode_stored,
    marker_tokens,
    topic_of,
)

__all__ = ["MarkerProbe"]


class MarkerProbe:
    """The probe's publisher (pod ``PROBE_POD``) and its polls; ``markers`` counts the
    events it published (one per batch), which the daemon applies like any other."""

    def __init__(self, http_port: int, progress: Progress) -> None:
        self._http_port = http_port
        self._progress = progress
        self._topic = topic_of(PROBE_POD)
        self.markers = 0  # also the next sequence number
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)

    async def connect(self, zmq_endpoint: str) -> None:
        """Connect to the daemon's SUB and wait until it has subscribed."""
        self._socket.connect(zmq_endpoint)
        deadline = time.monotonic() + 15.0
        while not self._socket.poll(0):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon never subscribed to the probe publisher")
            await asyncio.sleep(0.01)
        self._socket.recv()

    async def measure(self, state: str, count: int) -> Probes:
        """Publish a marker block, poll REST until a pod holds it; ``count`` times."""
        self._progress.step(f"probing event-to-visible lag ({state}, {count} markers)")
        rng = random.Random(99)
        poller = RawHttp(self._http_port)
        seen: list[float] = []
        rtts: list[float] = []
        timeouts = 0
        for _ in range(count):
            number = self.markers
            self.markers += 1
            tokens = marker_tokens(number)
            body = json.dumps({"model": MODEL, "token_ids": tokens}).encode()
            request = RawHttp.request("/v1/locality", body)
            payload = encode_stored(time.time(), [([MARKER_HASH_BASE + number], None, tokens)])
            frames = [self._topic, number.to_bytes(8, "big"), payload]
            start = time.perf_counter()
            self._socket.send_multipart(frames)
            visible = False
            while time.perf_counter() - start < 2.0:
                began = time.perf_counter()
                status, answer = await poller.send(request, body=True)
                done = time.perf_counter()
                rtts.append(done - began)
                if status == 200 and json.loads(answer)["pods"]:
                    seen.append(done - start)
                    visible = True
                    break
            if not visible:
                timeouts += 1
            self._progress.update(f"{len(seen)}/{count} markers seen")
            await asyncio.sleep(rng.uniform(0.02, 0.05))
        await poller.close()
        return Probes(
            state=state,
            count=len(seen),
            timeouts=timeouts,
            p50=quantile(seen, 0.5) if seen else None,
            p99=quantile(seen, 0.99) if seen else None,
            max=max(seen) if seen else None,
            poll_rtt=statistics.fmean(rtts) if rtts else None,
        )

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
