"""The engine pods: one process each (multiprocessing spawn, so they share no GIL with the
benchmark or each other), publishing through vLLM 0.33's own ``ZmqEventPublisher``.

Each binds its PUB socket on ``tcp://*:PORT`` (vLLM's default form) and, with replay, a
ROUTER on ``tcp://*:REPLAY_PORT``; the indexers connect to both. Topic ``""`` (vLLM's
default), ``BlockStored`` events of 16 blocks, one per batch unless told otherwise. All events
are built (token ids, vLLM's chained hashes, ``BlockStored`` structs) before ``ready`` is
answered, so publishing is only ``publish()`` and vLLM's own encode-and-send thread.

Commands over the pipe, each answered once: ``("probe", seconds)`` republishes the pod's
one-block probe prompt every 50 ms until ``("stop",)``; ``("phase", k)`` publishes phase k
at full speed and answers when vLLM's queue is drained; ``("churn", blocks_per_s, seconds)``
stores and evicts the churn prompts at that pace until ``("stop",)``; ``("exit",)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from loadtest.vs_dynamo.vllm_loader import Vllm, load
from loadtest.vs_dynamo.workload import (
    BLOCK_SIZE,
    BLOCKS_PER_EVENT,
    PROMPT_BLOCKS,
    Chunk,
    Stored,
    Workload,
    churn_prompts,
    probe_prompt,
    stored_events,
)

__all__ = ["ChurnReport", "PhaseReport", "PublisherSpec", "Publishers"]

_DRAIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class PublisherSpec:
    pod: int
    port: int
    replay_port: int | None
    vllm_site: Path
    phase_blocks: tuple[int, ...]
    seed: int
    events_per_batch: int = 1  # BlockStored events per batch (a scheduler step) in the phases


@dataclass(frozen=True)
class PhaseReport:
    """One pod's phase: monotonic times of its first ``publish()`` and of vLLM's queue
    drained (the last batch handed to ZeroMQ), and what it sent."""

    first: float
    drained: float
    batches: int
    blocks: int


@dataclass(frozen=True)
class ChurnReport:
    """One pod's paced run: blocks stored and evicted, for how long, how often it fell
    50 ms behind its pace, when vLLM's queue was drained, and its last event: blocks
    ``0 .. last_blocks - 1`` of churn prompt ``last_prompt``."""

    stored: int
    removed: int
    seconds: float
    behind: int
    drained: float
    last_prompt: int
    last_blocks: int


class _Engine:
    """A pod's vLLM publisher and its prebuilt events."""

    def __init__(self, spec: PublisherSpec, vllm: Vllm) -> None:
        self.vllm = vllm
        self.events_per_batch = spec.events_per_batch
        kv = vllm.kv_events
        workload = Workload(spec.phase_blocks)
        self.phases = [
            [self._stored(e) for e in stored_events(plan[spec.pod], spec.seed, *self._hash)]
            for plan in workload.phases
        ]
        (probe,) = stored_events([Chunk(probe_prompt(spec.pod), 0, 1)], spec.seed, *self._hash)
        self.probe = self._stored(probe)
        churn = [
            Chunk(prompt, first, BLOCKS_PER_EVENT)
            for prompt in churn_prompts(spec.pod)
            for first in range(0, PROMPT_BLOCKS, BLOCKS_PER_EVENT)
        ]
        churn_events = stored_events(churn, spec.seed, *self._hash)
        per_prompt = PROMPT_BLOCKS // BLOCKS_PER_EVENT
        self.churn = [
            [self._stored(e) for e in churn_events[i : i + per_prompt]]
            for i in range(0, len(churn_events), per_prompt)
        ]
        self.churn_hashes = [
            [h for e in churn_events[i : i + per_prompt] for h in e.block_hashes]
            for i in range(0, len(churn_events), per_prompt)
        ]
        self.publisher = kv.ZmqEventPublisher(
            data_parallel_rank=0,
            endpoint=f"tcp://*:{spec.port}",
            replay_endpoint=None if spec.replay_port is None else f"tcp://*:{spec.replay_port}",
            topic="",
        )

    @property
    def _hash(self) -> tuple[Any, Any]:
        return self.vllm.hasher, self.vllm.external

    def _stored(self, event: Stored) -> Any:
        return self.vllm.kv_events.BlockStored(
            block_hashes=event.block_hashes,
            parent_block_hash=event.parent_block_hash,
            token_ids=event.token_ids,
            block_size=BLOCK_SIZE,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )

    def publish(self, events: Sequence[Any]) -> None:
        # A batch per scheduler step, as vLLM's engine core sends them.
        self.publisher.publish(self.vllm.kv_events.KVEventBatch(ts=time.time(), events=events))

    def drain(self, timeout: float) -> float:
        """Wait until vLLM's publisher thread has sent everything queued; when it had."""
        # vLLM has no public flush; its thread calls task_done() after each send.
        queue = self.publisher._event_queue
        deadline = time.monotonic() + timeout
        while queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.0005)
        return time.monotonic()

    def run_phase(self, phase: int) -> PhaseReport:
        events, step = self.phases[phase], self.events_per_batch
        first = time.monotonic()
        for start in range(0, len(events), step):
            self.publish(events[start : start + step])
        drained = self.drain(_DRAIN_TIMEOUT)
        batches = -(-len(events) // step)
        return PhaseReport(first, drained, batches, sum(len(e.block_hashes) for e in events))

    def probe_until_stopped(self, seconds: float, conn: Connection) -> int:
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not conn.poll(0.05):
            self.publish([self.probe])
            sent += 1
        if conn.poll(0):
            conn.recv()  # the "stop"
        return sent

    def churn_until_stopped(
        self, blocks_per_second: float, seconds: float, conn: Connection
    ) -> ChurnReport:
        """Store the churn prompts in turn at the pace, evicting the oldest before each new
        one (a full cache: after the first round, one block evicted per block stored)."""
        kv = self.vllm.kv_events
        per_prompt = len(self.churn[0])
        interval = BLOCKS_PER_EVENT / blocks_per_second
        start = time.monotonic()
        due, deadline = start, start + seconds
        stored = removed = behind = step = 0
        held = [False] * len(self.churn)
        while time.monotonic() < deadline and not conn.poll(0):
            prompt, chunk = divmod(step, per_prompt)
            prompt %= len(self.churn)
            events: list[Any] = []
            oldest = (prompt + 1) % len(self.churn)
            if chunk == 0 and held[oldest]:
                events.append(kv.BlockRemoved(block_hashes=self.churn_hashes[oldest], medium="GPU"))
                removed += len(self.churn_hashes[oldest])
                held[oldest] = False
            events.append(self.churn[prompt][chunk])
            held[prompt] = True
            self.publish(events)
            stored += BLOCKS_PER_EVENT
            step += 1
            due += interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.05:
                due, behind = now, behind + 1
        elapsed = time.monotonic() - start
        if conn.poll(0):
            conn.recv()  # the "stop"
        drained = self.drain(_DRAIN_TIMEOUT)
        last, chunk = divmod(max(step - 1, 0), per_prompt)
        blocks = (chunk + 1) * BLOCKS_PER_EVENT if step else 0
        return ChurnReport(
            stored, removed, elapsed, behind, drained, last % len(self.churn), blocks
        )

    def close(self) -> None:
        self.publisher.shutdown()


def publisher_main(spec: PublisherSpec, conn: Connection) -> None:
    """A pod's process: build, answer ``ready``, obey commands until ``exit``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us in order
    started = time.monotonic()
    try:
        engine = _Engine(spec, load(spec.vllm_site))
    except Exception as error:  # reported to the parent, which stops the run
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", time.monotonic() - started))
    try:
        while conn.poll(1800):  # idle this long: the parent is gone
            command = conn.recv()
            if command[0] == "phase":
                conn.send(("done", engine.run_phase(command[1])))
            elif command[0] == "probe":
                conn.send(("done", engine.probe_until_stopped(command[1], conn)))
            elif command[0] == "churn":
                conn.send(("done", engine.churn_until_stopped(command[1], command[2], conn)))
            elif command[0] == "exit":
                return
    except (EOFError, BrokenPipeError):
        return
    finally:
        engine.close()


class Publishers:
    """The pod processes and their command pipes."""

    def __init__(self, specs: Sequence[PublisherSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=publisher_main, args=(spec, child), name=f"pod-{spec.pod}", daemon=True
            )
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None and p.is_alive()]

    def send(self, *command: Any) -> None:
        for conn in self.conns:
            conn.send(command)

    def replies(self, timeout: float) -> list[Any]:
        """Each pod's answer to the last command (``RuntimeError`` on error or timeout)."""
        deadline = time.monotonic() + timeout
        answers = []
        for pod, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"pod {pod} did not answer within {timeout:.0f} s")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"pod {pod}: {value}")
            answers.append(value)
        return answers

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))  # ends a probe or churn loop, ignored otherwise
                conn.send(("exit",))
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for conn in self.conns:
            conn.close()
