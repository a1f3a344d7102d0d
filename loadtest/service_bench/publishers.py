"""The publisher processes: stand-in vLLM engines feeding the daemon over ZeroMQ.

Each process preloads its pod's prefix of the query prompt, then obeys commands from its
pipe: ``("burst", batches)`` answers ``("done", events)``; ``("rate", blocks_per_second,
max_seconds, phase)`` publishes paced until ``("stop",)`` and answers ``("done", events,
catch-up skips)``; ``("exit",)`` ends it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from loadtest.service_bench.daemon import cpu_seconds
from loadtest.service_bench.workload import (
    BLOCK_SIZE,
    BLOCKS_PER_EVENT,
    CHAIN_EVENTS,
    PROMPT_HASH_BASE,
    TOKEN_LIMIT,
    Stored,
    encode_stored,
    pod_id,
    topic_of,
)

__all__ = ["PublisherSpec", "Publishers"]


@dataclass(frozen=True)
class PublisherSpec:
    index: int
    endpoint: str
    cpus: frozenset[int] | None
    prompt: tuple[int, ...]
    prefix_blocks: int
    events_per_batch: int = 1


class _Engine:
    """One stand-in vLLM engine in a publisher process: its socket, sequence and chains."""

    def __init__(self, spec: PublisherSpec, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.spec = spec
        self.topic = topic_of(pod_id(spec.index))
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.connect(spec.endpoint)
        self.seq = 0
        rng = random.Random(1000 + spec.index)
        self.template = [
            rng.randrange(TOKEN_LIMIT) for _ in range(CHAIN_EVENTS * BLOCKS_PER_EVENT * BLOCK_SIZE)
        ]
        self.next_hash = (spec.index + 1) << 56
        self.chain = self.position = 0
        self.parent: int | None = None

    def wait_subscribed(self, timeout: float) -> bool:
        if not self.socket.poll(int(timeout * 1000)):
            return False
        self.socket.recv()
        return True

    def send(self, events: Sequence[Stored]) -> None:
        payload = encode_stored(time.time(), events)
        self.socket.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def preload(self) -> int:
        """Store the first ``prefix_blocks`` blocks of the query prompt; returns events."""
        tokens_per_event = BLOCKS_PER_EVENT * BLOCK_SIZE
        events = self.spec.prefix_blocks // BLOCKS_PER_EVENT
        for k in range(events):
            first = k * BLOCKS_PER_EVENT
            hashes = [PROMPT_HASH_BASE + j for j in range(first, first + BLOCKS_PER_EVENT)]
            parent = PROMPT_HASH_BASE + first - 1 if k else None
            tokens = list(self.spec.prompt[k * tokens_per_event : (k + 1) * tokens_per_event])
            self.send([(hashes, parent, tokens)])
        return events

    def send_load_batch(self) -> None:
        """A batch of ``events_per_batch`` load events."""
        self.send([self.load_event() for _ in range(self.spec.events_per_batch)])

    def load_event(self) -> Stored:
        """The next 32 blocks of this engine's current prompt (new prompt every 8 events)."""
        n = BLOCKS_PER_EVENT * BLOCK_SIZE
        tokens = self.template[self.position * n : (self.position + 1) * n]
        parent = self.parent
        if self.position == 0:
            # A new root block: every key of the chain is new, and differs between engines.
            tokens[0], tokens[1], tokens[2] = self.chain % 100_000, self.chain // 100_000, 7
            tokens[3] = self.spec.index
            parent = None
        hashes = list(range(self.next_hash, self.next_hash + BLOCKS_PER_EVENT))
        self.next_hash += BLOCKS_PER_EVENT
        self.parent = hashes[-1]
        self.position += 1
        if self.position == CHAIN_EVENTS:
            self.position = 0
            self.chain += 1
        return hashes, parent, tokens

    def burst(self, batches: int) -> int:
        """Send ``batches`` load batches back to back; returns events."""
        for _ in range(batches):
            self.send_load_batch()
        return batches * self.spec.events_per_batch

    def paced(
        self, blocks_per_second: float, max_seconds: float, phase: float, conn: Connection
    ) -> tuple[int, int]:
        """Publish at the rate until told to stop (or ``max_seconds``); returns
        (events sent, times it fell > 50 ms behind and skipped ahead)."""
        interval = BLOCKS_PER_EVENT * self.spec.events_per_batch / blocks_per_second
        start = time.perf_counter()
        due = start + phase * interval
        deadline = start + max_seconds
        sent = skipped = 0
        while True:
            if conn.poll(0):
                conn.recv()  # "stop"
                break
            now = time.perf_counter()
            if now >= deadline:
                break
            if due > now:
                time.sleep(due - now)
            self.send_load_batch()
            sent += self.spec.events_per_batch
            due += interval
            if time.perf_counter() - due > 0.05:
                due = time.perf_counter()
                skipped += 1
        return sent, skipped


def publisher_main(spec: PublisherSpec, conn: Connection) -> None:
    """A publisher process: preload, then obey the parent's commands until ``exit``."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    engine = _Engine(spec, context)
    try:
        if not engine.wait_subscribed(15.0):
            conn.send(("error", "no subscription from the daemon"))
            return
        conn.send(("ready", engine.preload()))
        while conn.poll(900):  # idle this long: the parent is gone
            command = conn.recv()
            if command[0] == "burst":
                conn.send(("done", engine.burst(command[1])))
            elif command[0] == "rate":
                conn.send(("done", *engine.paced(command[1], command[2], command[3], conn)))
            elif command[0] == "exit":
                return
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        engine.socket.close(linger=0)
        context.term()


class Publishers:
    """The publisher processes and their command pipes."""

    def __init__(self, specs: list[PublisherSpec]) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process that has grpc loaded
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=publisher_main, args=(spec, child), name=f"publisher-{spec.index}"
            )
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)
        self.events_sent = 0
        self.events_per_batch = specs[0].events_per_batch if specs else 1

    def wait_ready(self, timeout: float) -> None:
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError("a publisher did not start")
            reply = conn.recv()
            if reply[0] != "ready":
                raise RuntimeError(f"a publisher failed: {reply}")
            self.events_sent += reply[1]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes if p.pid is not None)

    def send_all(self, command: tuple[Any, ...]) -> None:
        for conn in self.conns:
            conn.send(command)

    async def replies(self, within: float) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + within
        replies: list[tuple[Any, ...]] = []
        for conn in self.conns:
            while not conn.poll(0):
                if time.monotonic() > deadline:
                    raise RuntimeError("a publisher did not answer")
                await asyncio.sleep(0.005)
            replies.append(conn.recv())
        return replies

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))  # ends a paced run, ignored otherwise
                conn.send(("exit",))
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for conn in self.conns:
            conn.close()
