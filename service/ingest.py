"""Ingestion: identify, order, decode, translate and apply live and replayed batches.

Per (pod, dp rank) it tracks the engine's sequence numbers (CONTRACT.md section 6):
- first contact with a pod that has a replay endpoint: replay from 0;
- a gap: replay from last + 1 when a replay endpoint is known, else count the loss;
- a sequence lower than expected: the engine restarted: clear the pod, then replay from 0.
While a replay runs, live frames of that pod wait in order and apply after it; replayed
batches already applied are skipped by sequence number.

Frames wait in one bounded queue (full: dropped and counted); the consumer yields to the
event loop every ``_SLICE_SECONDS`` so a burst of events delays visibility, not queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from service.events.model import Event, EventBatch
from service.events.replay import ReplayedBatch, Replayer, ReplayError
from service.events.subscriber import Frame
from service.events.vllm import DecodeError, decode_batch
from service.index.protocol import BlockIndex, ClearPod, PodRank
from service.models import ModelRegistry
from service.status import ModelStatus, PodState, PodStatus, Readiness
from service.telemetry import Metrics

__all__ = ["Ingestor", "parse_topic"]

log = structlog.get_logger("kv_cache.ingest")

_SLICE_SECONDS = 0.0005
_MAX_SLICE_SECONDS = 0.002
_BEHIND_SECONDS = 0.005
_MAX_PENDING = 10_000
# Events of one batch translated and applied together; a batch yields between such steps
# once its slice is used up, so one large batch cannot hold queries up for its whole length.
_EVENTS_PER_STEP = 4


def parse_topic(topic: bytes) -> tuple[str | None, str | None]:
    """``kv@<pod>@<model>`` -> (pod, model); parts that are missing or empty are None."""
    parts = topic.decode("utf-8", "replace").split("@", 2)
    pod = parts[1] if len(parts) > 1 and parts[1] else None
    model = parts[2] if len(parts) > 2 and parts[2] else None
    return pod, model


@dataclass(slots=True)
class _Stream:
    """Sequence state of one engine process (a pod's dp rank)."""

    pod: PodRank
    model: str
    last_seq: int | None = None
    last_time: float | None = None
    batches: int = 0
    gaps: int = 0
    lost: int = 0
    replays: int = 0
    restarts: int = 0
    replaying: bool = False
    pending: list[tuple[int, EventBatch | None]] = field(default_factory=list)


class Ingestor:
    """Applies event batches to the index, in order, per engine stream."""

    def __init__(
        self,
        index: BlockIndex,
        models: ModelRegistry,
        metrics: Metrics,
        *,
        queue_size: int,
        replayer: Replayer | None,
        replay_concurrency: int,
        replay_endpoint_for: Callable[[str, int], str | None],
        stale_after: float,
    ) -> None:
        self._index = index
        self._models = models
        self._metrics = metrics
        self._queue: asyncio.Queue[Frame] = asyncio.Queue(queue_size)
        self._replayer = replayer
        self._replay_slots = asyncio.Semaphore(replay_concurrency)
        self._replay_endpoint_for = replay_endpoint_for
        self._stale_after = stale_after
        self._streams: dict[PodRank, _Stream] = {}
        self._replays: set[asyncio.Task[None]] = set()
        self._warned_topics: set[bytes] = set()
        # pod id -> when it was forgotten: frames it sent before then are stale.
        self._forgotten: dict[str, float] = {}
        self._live_batches = metrics.batches_received.labels("live")
        self._yield_at = 0.0  # when a batch applying now should let queries run
        self.ready = False
        self.failure: str | None = None  # set when a background part died

    # -- intake -------------------------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """Queue a live frame; never blocks (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._metrics.decode_errors.labels("queue_full").inc()

    def bad_frame(self, reason: str) -> None:
        self._metrics.decode_errors.labels(reason).inc()

    async def run(self) -> None:
        """Consume the queue until cancelled.

        Work goes in slices of ``_SLICE_SECONDS`` between which queries run; while the
        oldest waiting frame is older than ``_BEHIND_SECONDS`` a slice may stretch to
        ``_MAX_SLICE_SECONDS``, so a stream of queries cannot starve ingestion.
        """
        queue = self._queue
        while True:
            frame = await queue.get()
            start = time.perf_counter()
            soft_end, hard_end = start + _SLICE_SECONDS, start + _MAX_SLICE_SECONDS
            # A batch of many events may yield within itself (``_apply``), here normally,
            # at the hard end when behind.
            self._yield_at = soft_end
            while True:
                await self._live_guarded(frame)
                if queue.empty():
                    break
                now = time.perf_counter()
                if now > hard_end:
                    break
                frame = queue.get_nowait()
                behind = time.time() - frame.received >= _BEHIND_SECONDS
                self._yield_at = hard_end if behind else soft_end
                if now > soft_end and not behind:
                    await self._live_guarded(frame)
                    break
            self._metrics.queue_depth.set(queue.qsize())
            await asyncio.sleep(0)

    async def _live_guarded(self, frame: Frame) -> None:
        # A bug or a backend failure on one frame must not stop ingestion for good.
        try:
            await self._live(frame)
        except Exception:
            self._metrics.decode_errors.labels("internal_error").inc()
            log.exception("frame not applied", topic=frame.topic.decode("utf-8", "replace"))

    async def drain(self, seconds: float) -> None:
        """Apply what is queued (at shutdown), for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self._queue.empty() and time.monotonic() < deadline:
            await self._live_guarded(self._queue.get_nowait())

    async def close(self) -> None:
        for task in list(self._replays):
            task.cancel()
        await asyncio.gather(*self._replays, return_exceptions=True)

    # -- sequencing ---------------------------------------------------------------------

    async def _live(self, frame: Frame) -> None:
        topic_pod, topic_model = parse_topic(frame.topic)
        pod_id = frame.source.pod_id or topic_pod
        model = topic_model or frame.source.model
        if pod_id is None or model is None:
            self._unidentified(frame)
            return
        forgotten_at = self._forgotten.get(pod_id)
        if forgotten_at is not None:
            if frame.received <= forgotten_at:
                self._metrics.decode_errors.labels("pod_dropped").inc()
                return
            del self._forgotten[pod_id]
        batch = self._decode(frame.payload)
        rank = frame.source.rank
        if batch is not None and batch.data_parallel_rank is not None:
            rank = batch.data_parallel_rank
        self._live_batches.inc()
        pod = PodRank(pod_id, rank)
        stream = self._streams.get(pod)
        if stream is None:
            stream = self._streams[pod] = _Stream(pod, model)
            self._metrics.pods_tracked.set(len(self._streams))
            log.info("pod seen", pod=str(pod), model=model, seq=frame.seq)
        if stream.model != model:
            # The pod now serves another model (an IP reused by a new engine): what it held
            # for the old one is gone.
            log.warning("pod changed model", pod=str(pod), old=stream.model, new=model)
            await self._index.apply(stream.model, pod, [ClearPod()])
            stream.model = model
        stream.last_time = frame.received
        if stream.replaying:
            self._hold(stream, frame.seq, batch)
            return
        replay_endpoint = frame.source.replay_endpoint or self._replay_endpoint_for(pod_id, rank)
        await self._sequence(stream, frame.seq, batch, replay_endpoint)

    async def _sequence(
        self,
        stream: _Stream,
        seq: int,
        batch: EventBatch | None,
        replay_endpoint: str | None,
        *,
        gap_counted: bool = False,
    ) -> None:
        can_replay = replay_endpoint is not None and self._replayer is not None
        last = stream.last_seq
        if last is None:
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, 0, seq, batch)
        elif seq > last + 1:
            if not gap_counted:
                stream.gaps += 1
                self._metrics.sequence_gaps.labels(stream.pod.pod_id).inc()
                log.warning("sequence gap", pod=str(stream.pod), expected=last + 1, got=seq)
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, last + 1, seq, batch)
            self._lose(stream, seq - last - 1)
        elif seq <= last:
            stream.restarts += 1
            self._metrics.engine_restarts.labels(stream.pod.pod_id).inc()
            log.warning("engine restarted", pod=str(stream.pod), last_seq=last, seq=seq)
            await self._index.apply(stream.model, stream.pod, [ClearPod()])
            stream.last_seq = None
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, 0, seq, batch)
        await self._apply(stream, seq, batch)

    def _start_replay(
        self,
        stream: _Stream,
        endpoint: str,
        start: int,
        seq: int,
        batch: EventBatch | None,
    ) -> None:
        stream.replaying = True
        stream.replays += 1
        self._hold(stream, seq, batch)
        task = asyncio.create_task(self._replay(stream, endpoint, start), name="replay")
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay(self, stream: _Stream, endpoint: str, start: int) -> None:
        log.info("replay started", pod=str(stream.pod), endpoint=endpoint, from_seq=start)
        began = time.perf_counter()
        try:
            applied = await self._apply_replay(stream, await self._fetch(stream, endpoint, start))
        finally:
            stream.replaying = False
        log.info(
            "replay done",
            pod=str(stream.pod),
            from_seq=start,
            applied=applied,
            last_seq=stream.last_seq,
            seconds=round(time.perf_counter() - began, 4),
        )

    async def _fetch(self, stream: _Stream, endpoint: str, start: int) -> list[ReplayedBatch]:
        assert self._replayer is not None
        began = time.perf_counter()
        try:
            async with self._replay_slots:
                replayed = await self._replayer.fetch(endpoint, start)
        except ReplayError as error:
            self._metrics.replays.labels(error.reason).inc()
            log.warning("replay failed", pod=str(stream.pod), endpoint=endpoint, error=str(error))
            replayed = []
        else:
            self._metrics.replays.labels("ok").inc()
        self._metrics.replay_duration.observe(time.perf_counter() - began)
        return replayed

    async def _apply_replay(self, stream: _Stream, replayed: list[ReplayedBatch]) -> int:
        """Applies replayed batches, then the live frames held meanwhile; returns how many
        replayed batches applied. Yields to the loop between slices, as ``run`` does, and
        stops if the pod was forgotten meanwhile."""
        applied = 0
        slice_end = time.perf_counter() + _SLICE_SECONDS
        for item in replayed:
            if self._streams.get(stream.pod) is not stream:
                return applied
            last = stream.last_seq
            if last is not None and item.seq <= last:
                continue
            if last is not None and item.seq > last + 1:
                self._lose(stream, item.seq - last - 1)
            self._metrics.batches_received.labels("replay").inc()
            await self._apply(stream, item.seq, self._decode(item.payload), live=False)
            applied += 1
            if time.perf_counter() > slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_SECONDS
        # Live frames held meanwhile apply in order. The first is the one that started the
        # replay: a gap still left before it was counted then, and is a loss now. A frame
        # numbered below the one before it is an engine restart, never a duplicate.
        previous: int | None = None
        first = True
        while stream.pending:
            if self._streams.get(stream.pod) is not stream:
                return applied
            seq, batch = stream.pending.pop(0)
            restarted = previous is not None and seq < previous
            previous = seq
            if not restarted and stream.last_seq is not None and seq <= stream.last_seq:
                first = False
                continue  # the replay already brought it
            await self._sequence(stream, seq, batch, None, gap_counted=first)
            first = False
            if time.perf_counter() > slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_SECONDS
        return applied

    def _hold(self, stream: _Stream, seq: int, batch: EventBatch | None) -> None:
        if len(stream.pending) >= _MAX_PENDING:
            self._metrics.decode_errors.labels("replay_buffer_full").inc()
            return
        stream.pending.append((seq, batch))

    def _lose(self, stream: _Stream, batches: int) -> None:
        stream.lost += batches
        self._metrics.lost_batches.labels(stream.pod.pod_id).inc(batches)

    # -- applying -----------------------------------------------------------------------

    def _decode(self, payload: bytes) -> EventBatch | None:
        try:
            batch = decode_batch(payload)
        except DecodeError as error:
            self._metrics.decode_errors.labels(error.reason).inc()
            log.debug("batch not decodable", reason=error.reason, error=str(error))
            return None
        for reason, count in batch.skipped.items():
            self._metrics.decode_errors.labels(reason).inc(count)
        return batch

    async def _apply(
        self, stream: _Stream, seq: int, batch: EventBatch | None, *, live: bool = True
    ) -> None:
        stream.last_seq = seq
        stream.batches += 1
        if batch is None or not batch.events:
            return
        events = batch.events
        await self._apply_events(stream, events[:_EVENTS_PER_STEP])
        for start in range(_EVENTS_PER_STEP, len(events), _EVENTS_PER_STEP):
            if time.perf_counter() > self._yield_at:
                # The slice is used up: queries waiting run before the rest of the batch.
                await asyncio.sleep(0)
                self._yield_at = time.perf_counter() + _SLICE_SECONDS
                if self._streams.get(stream.pod) is not stream:
                    return  # forgotten meanwhile: its entries must not come back
            await self._apply_events(stream, events[start : start + _EVENTS_PER_STEP])
        if live:  # a replayed batch is late by design: its lag says nothing of the stream
            lag = max(0.0, time.time() - batch.ts)
            self._metrics.event_lag.labels(stream.pod.pod_id).set(lag)
            self._metrics.visible_lag.observe(lag)

    async def _apply_events(self, stream: _Stream, events: Sequence[Event]) -> None:
        model = self._models.get_or_add(stream.model)
        translation = model.translator.translate(events)
        metrics = self._metrics
        by_type: dict[str, int] = {}
        for event in events:
            name = type(event).__name__
            by_type[name] = by_type.get(name, 0) + 1
        for name, count in by_type.items():
            metrics.events_received.labels(name).inc(count)
        for reason, count in translation.skipped.items():
            metrics.decode_errors.labels(reason).inc(count)
        if translation.hash_checks:
            mismatches = model.record(translation.hash_checks)
            if mismatches:
                metrics.hash_mismatches.labels(stream.model).inc(mismatches)
                if model.hash_mismatches == mismatches:
                    log.error(
                        "engine block hashes differ from ours",
                        model=stream.model,
                        pod=str(stream.pod),
                        key_mode="vllm",
                        likely_cause="hash_algorithm or hash_seed (PYTHONHASHSEED) differ from"
                        " the engine's; or the engine's vLLM version hashes differently",
                    )
        if translation.ops:
            await self._index.apply(stream.model, stream.pod, translation.ops)

    def _unidentified(self, frame: Frame) -> None:
        self._metrics.decode_errors.labels("unidentified").inc()
        if frame.topic not in self._warned_topics and len(self._warned_topics) < 1000:
            self._warned_topics.add(frame.topic)
            log.warning(
                "batch names no pod or model; dropped",
                topic=frame.topic.decode("utf-8", "replace"),
                hint="set the engine's topic to kv@<pod-ip:port>@<model>, or list the pod"
                " under zmq.pods",
            )

    # -- status -------------------------------------------------------------------------

    async def forget_pod(self, pod_id: str) -> None:
        """Drop a pod: its streams and its entries (e.g. the pod was deleted).

        Frames it sent before now and still queued are dropped, so they cannot bring it back.
        """
        self._forgotten[pod_id] = time.time()
        for pod in [p for p in self._streams if p.pod_id == pod_id]:
            del self._streams[pod]
        await self._index.drop_pod(pod_id)
        self._metrics.pods_tracked.set(len(self._streams))
        self._metrics.forget_pod(pod_id)

    async def pods(self) -> list[PodStatus]:
        stats = await self._index.stats()
        now = time.time()
        found = []
        for pod, stream in sorted(self._streams.items()):
            state: PodState = "live"
            if stream.replaying:
                state = "replaying"
            elif stream.last_time is None or now - stream.last_time > self._stale_after:
                state = "stale"
            found.append(
                PodStatus(
                    pod_id=pod.pod_id,
                    dp_rank=pod.dp_rank,
                    model=stream.model,
                    blocks=stats.entries_by_pod.get((stream.model, pod), 0),
                    state=state,
                    last_event_time=stream.last_time,
                    last_seq=stream.last_seq,
                    batches=stream.batches,
                    gaps=stream.gaps,
                    lost_batches=stream.lost,
                    replays=stream.replays,
                    restarts=stream.restarts,
                )
            )
        return found

    async def models(self) -> list[ModelStatus]:
        stats = await self._index.stats()
        blocks: dict[str, int] = {}
        pods: dict[str, int] = {}
        for (model, _), count in stats.entries_by_pod.items():
            blocks[model] = blocks.get(model, 0) + count
            pods[model] = pods.get(model, 0) + 1
        return [
            ModelStatus(
                name=m.name,
                key_mode=m.translator.key_mode,
                configured=m.configured,
                block_size=m.translator.block_size,
                blocks=blocks.get(m.name, 0),
                pods=pods.get(m.name, 0),
                hash_matches=m.hash_matches,
                hash_mismatches=m.hash_mismatches,
            )
            for m in sorted(self._models.all(), key=lambda m: m.name)
        ]

    async def readiness(self) -> Readiness:
        warnings = tuple(
            f"model {m.name!r}: {m.hash_mismatches} engine block hashes differ from ours"
            " (check hash_algorithm and hash_seed / PYTHONHASHSEED)"
            for m in self._models.all()
            if m.hash_mismatches
        )
        if self.failure is not None:
            return Readiness(False, (self.failure,), warnings)
        if not self.ready:
            return Readiness(False, ("starting",), warnings)
        return Readiness(True, (), warnings)
