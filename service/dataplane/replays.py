"""Fetching replays for a data plane: concurrency-bounded, timed, counted, logged.

The data planes decide when a stream needs a replay; this runs the fetch (through
``events.replay.Replayer``) and hands the batches back, in a task it owns until it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from service.events.replay import ReplayedBatch, Replayer, ReplayError
from service.telemetry import Metrics

__all__ = ["ReplayRunner"]

log = structlog.get_logger("kv_cache.replay")

ReplayDone = Callable[[list[ReplayedBatch], bool], Awaitable[None] | None]
"""Gets the batches fetched (empty when the fetch failed) and whether it succeeded."""


class ReplayRunner:
    """Runs replay fetches, at most ``concurrency`` at once."""

    def __init__(self, replayer: Replayer, *, concurrency: int, metrics: Metrics) -> None:
        self._replayer = replayer
        self._slots = asyncio.Semaphore(concurrency)
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, pod: str, endpoint: str, start_seq: int, done: ReplayDone) -> None:
        """Fetches every buffered batch from ``start_seq`` on, then calls ``done``."""
        task = asyncio.create_task(self._run(pod, endpoint, start_seq, done), name="replay")
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("replay task failed", error=repr(error), exc_info=error)

    async def _run(self, pod: str, endpoint: str, start_seq: int, done: ReplayDone) -> None:
        log.info("replay started", pod=pod, endpoint=endpoint, from_seq=start_seq)
        began = time.perf_counter()
        ok = True
        try:
            async with self._slots:
                batches = await self._replayer.fetch(endpoint, start_seq)
        except ReplayError as error:
            self._metrics.replays.labels(error.reason).inc()
            log.warning("replay failed", pod=pod, endpoint=endpoint, error=str(error))
            batches, ok = [], False
        else:
            self._metrics.replays.labels("ok").inc()
        seconds = time.perf_counter() - began
        self._metrics.replay_duration.observe(seconds)
        result = done(batches, ok)
        if result is not None:
            await result
        log.info(
            "replay done",
            pod=pod,
            from_seq=start_seq,
            batches=len(batches),
            seconds=round(seconds, 4),
        )

    async def close(self) -> None:
        """Cancels the fetches still running and waits for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
