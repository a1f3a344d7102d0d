"""A 400,000-block burst from 8 engines at full speed is ingested whole, in bind and in
connect mode, with the default configuration (no replay endpoints to fall back on).

Each engine is a process of its own that pre-encodes its batches (16 blocks each, chained
prompts of 128 blocks, vLLM 0.33's map form) and then sends them back to back as fast as
its socket takes them. Afterwards every block must be visible: each pod holds exactly what
it stored, its sequence is complete, nothing was dropped or lost, and its prompts match.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from multiprocessing.connection import Connection
from typing import Any

import zmq

from tests.e2e.harness import Daemon, daemon, free_port, wait_for
from tests.support.vllm_wire import encode_batch, stored

PODS = 8
BLOCKS_PER_POD = 50_000
BLOCKS_PER_EVENT = 16
EVENTS_PER_CHAIN = 8
BLOCK_SIZE = 16
EVENTS = BLOCKS_PER_POD // BLOCKS_PER_EVENT
MODEL = "burst-model"


def pod_id(index: int) -> str:
    return f"10.0.2.{index + 1}:8000"


def chain_tokens(pod: int, chain: int) -> list[int]:
    rng = random.Random(pod * 1_000_003 + chain)
    return [rng.randrange(150_000) for _ in range(EVENTS_PER_CHAIN * BLOCKS_PER_EVENT * BLOCK_SIZE)]


def frames_of(pod: int) -> list[list[bytes]]:
    """Every frame one engine sends: chained BlockStored events, sequence 0 upwards."""
    topic = f"kv@{pod_id(pod)}@{MODEL}".encode()
    frames = []
    span = BLOCKS_PER_EVENT * BLOCK_SIZE
    tokens_of_chain: list[int] = []
    for seq in range(EVENTS):
        chain, position = divmod(seq, EVENTS_PER_CHAIN)
        if position == 0:
            tokens_of_chain = chain_tokens(pod, chain)
        tokens = tokens_of_chain[position * span : (position + 1) * span]
        first = (pod + 1) << 40 | seq * BLOCKS_PER_EVENT
        hashes = list(range(first, first + BLOCKS_PER_EVENT))
        parent = None if position == 0 else first - 1
        payload = encode_batch(
            [stored(hashes, tokens, block_size=BLOCK_SIZE, parent=parent)],
            ts=time.time(),
            version="0.33",
            dp_rank=None,
        )
        frames.append([topic, seq.to_bytes(8, "big"), payload])
    return frames


def engine(pod: int, endpoint: str, bind: bool, conn: Connection) -> None:
    """One engine process: encode, wait for the subscription, send everything at once."""
    frames = frames_of(pod)
    context = zmq.Context()
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.LINGER, 5000)
    socket.setsockopt(zmq.SNDHWM, 100_000)  # vLLM's publisher sets the same
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    try:
        if not socket.poll(20_000):
            conn.send("no subscription")
            return
        socket.recv()
        conn.send("ready")
        conn.recv()  # go
        for frame in frames:
            socket.send_multipart(frame)
        conn.send("sent")
    finally:
        socket.close()
        context.term()


class Engines:
    """The engine processes; ``go`` has them send their burst and waits until they have."""

    def __init__(self, endpoints: list[str], *, bind: bool) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for pod, endpoint in enumerate(endpoints):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=engine, args=(pod, endpoint, bind, child))
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def go(self) -> None:
        for pipe in self.pipes:
            assert pipe.poll(60), "an engine saw no subscription"
            assert pipe.recv() == "ready"
        for pipe in self.pipes:
            pipe.send("go")
        for pipe in self.pipes:
            assert pipe.poll(60) and pipe.recv() == "sent"

    def close(self) -> None:
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()


def check_everything_visible(running: Daemon) -> None:
    def complete() -> list[dict[str, Any]] | None:
        pods: list[dict[str, Any]] = running.http.get("/v1/pods").json()["pods"]
        done = [p for p in pods if p["last_seq"] == EVENTS - 1]
        return pods if len(done) == PODS else None

    pods = wait_for(complete, timeout=60.0, what="every engine's last batch applied")
    for status in pods:
        assert status["blocks"] == BLOCKS_PER_POD, status
        assert (status["gaps"], status["lost_batches"], status["dropped"]) == (0, 0, 0), status
        assert status["batches"] == EVENTS, status
    assert running.metric("kv_cache_blocks") == PODS * BLOCKS_PER_POD
    assert running.metric("kv_cache_event_decode_errors_total", reason="buffer_full") == 0
    assert running.metric("kv_cache_events_received_total", type="BlockStored") == PODS * EVENTS
    chains = EVENTS // EVENTS_PER_CHAIN
    for pod in range(PODS):
        for chain in (0, chains // 2, chains - 1):
            answer = running.matches(MODEL, chain_tokens(pod, chain))
            assert answer == {pod_id(pod): EVENTS_PER_CHAIN * BLOCKS_PER_EVENT}, (pod, chain)


def test_a_burst_in_bind_mode_is_ingested_whole() -> None:
    port = free_port()
    with daemon({"zmq": {"endpoint": f"tcp://127.0.0.1:{port}"}}) as running:
        engines = Engines([f"tcp://127.0.0.1:{port}"] * PODS, bind=False)
        try:
            engines.go()
        finally:
            engines.close()
        check_everything_visible(running)


def test_a_burst_in_connect_mode_is_ingested_whole() -> None:
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(PODS)]
    pods = [
        {"pod_id": pod_id(i), "endpoint": endpoint, "model": MODEL}
        for i, endpoint in enumerate(endpoints)
    ]
    # The engines bind (as vLLM's publisher does for tcp://*:port); the daemon connects.
    engines = Engines(endpoints, bind=True)
    try:
        with daemon({"zmq": {"endpoint": "", "pods": pods}}) as running:
            engines.go()
            check_everything_visible(running)
    finally:
        engines.close()
