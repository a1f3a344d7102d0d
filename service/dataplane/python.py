"""The Python data plane: the reference the native one is held to, run only when asked
(``data_plane: python``).

Everything happens on the event loop: the subscriber (events/subscriber.py, the transport)
drains the SUB sockets into a buffer bounded by bytes; a consumer task works through it in
slices of ``_SLICE_SECONDS`` between which queries run; each frame is identified here,
sequenced per (pod, rank) (sequencing.py), decoded and applied to the reference index
(apply.py, over events/vllm.py, index/translate.py, index/reference.py), and its stream
reported (registry.py). Clear and slow, by design: it shows what the
native plane must do, not how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import zmq.asyncio

from service.config import Settings
from service.dataplane.apply import BatchApplier
from service.dataplane.protocol import DataPlaneKind, Lookup, PlaneCounts
from service.dataplane.registry import StreamSnapshot, pod_statuses, stream_warnings
from service.dataplane.replays import ReplayRunner
from service.dataplane.sequencing import Stream, StreamSequencer
from service.events.subscriber import Frame, PodEndpoint, Subscriber, offset_port
from service.index.protocol import EVICTION_REASONS, BlockIndex, ClearPod, IndexStats, PodRank
from service.models import ModelRegistry
from service.scoring import TierWeights, score_pods
from service.status import ModelStatus, PodStatus
from service.telemetry import LATENCY_BUCKETS

__all__ = ["PythonDataPlane", "parse_topic"]

log = structlog.get_logger("kv_cache.ingest")

_SLICE_SECONDS = 0.0005
_MAX_SLICE_SECONDS = 0.002
_BEHIND_SECONDS = 0.005
_FRAME_OVERHEAD = 128  # bytes a queued frame costs beyond its payload and topic
_MAX_RANK = 1 << 16
_MAX_WARNED_TOPICS = 1000
_SWEEP_BUDGET = 20_000
_SWEEP_STEPS = 100


@dataclass(frozen=True, slots=True)
class _Dropped:
    """Queued in the place of frames dropped (the buffer full), so that the stream is
    flagged in order: after the frames that came before them, before those after."""

    pod: str


def parse_topic(topic: bytes) -> tuple[str | None, str | None]:
    """``kv@<pod>@<model>`` -> (pod, model); parts missing or empty are None, and so is
    everything in a topic that is not UTF-8 (a sender's garbage names nobody)."""
    try:
        parts = topic.decode("utf-8").split("@", 2)
    except UnicodeDecodeError:
        return None, None
    pod = parts[1] if len(parts) > 1 and parts[1] else None
    model = parts[2] if len(parts) > 2 and parts[2] else None
    return pod, model


class PythonDataPlane:
    """``DataPlane`` in Python, on the event loop."""

    def __init__(
        self,
        settings: Settings,
        index: BlockIndex,
        context: zmq.asyncio.Context,
        replays: ReplayRunner | None,
    ) -> None:
        self._settings = settings
        self._index = index
        self._models = ModelRegistry(settings.models, max_engine_hashes=settings.index.max_size)
        weights = settings.scoring.tier_weights
        self._weights = TierWeights(weights.gpu, weights.cpu, weights.disk)
        self._replay_endpoints = {
            pod.pod_id: pod.replay_endpoint for pod in settings.zmq.pods if pod.replay_endpoint
        }
        self._subscriber = Subscriber(
            context,
            topic_filter=settings.zmq.topic_filter,
            sink=self._submit,
            on_bad_frame=self._count_drop,
        )
        self._applier = BatchApplier(index, self._models)
        self._sequencer = StreamSequencer(
            apply=self._applier.apply,
            clear=self._applier.clear,
            decode=self._applier.decode,
            replays=replays,
            count_drop=self._applier.count_drop,
            count_replayed=lambda: self._batches.update(("replay",)),
        )
        self._replays = replays
        self._buffer: deque[Frame | _Dropped] = deque()
        self._buffer_bytes = 0
        self._frames_waiting = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: str | None = None
        self._warned_topics: set[bytes] = set()
        # Pods whose drop marker is queued and no frame of theirs since.
        self._overflowed: set[str] = set()
        # pod id -> when it was forgotten: frames it sent before then are stale.
        self._forgotten: dict[str, float] = {}
        self._batches: Counter[str] = Counter({"live": 0, "replay": 0})
        self._dropped_by_pod: Counter[str] = Counter()
        self._unseen_overflows: Counter[str] = Counter()
        self._index_stats = IndexStats(0, {}, {}, dict.fromkeys(EVICTION_REASONS, 0))

    @property
    def kind(self) -> DataPlaneKind:
        return "python"

    @property
    def failure(self) -> str | None:
        return self._failure

    # -- sockets ----------------------------------------------------------------------

    def bind(self, endpoint: str, data_parallel_size: int) -> list[str]:
        try:
            return self._subscriber.bind(endpoint, data_parallel_size)
        except zmq.ZMQError as error:
            raise OSError(f"cannot bind {endpoint}: {error}") from error

    def connect(self, pod: PodEndpoint) -> None:
        self._subscriber.connect(pod)

    def disconnect(self, pod_id: str) -> None:
        self._subscriber.disconnect(pod_id)

    async def forget_pod(self, pod_id: str) -> None:
        self._forgotten[pod_id] = time.time()
        for pod in [p for p in self._sequencer.streams if p.pod_id == pod_id]:
            del self._sequencer.streams[pod]
        await self._index.drop_pod(pod_id)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._index_stats = await self._index.stats()
        for coroutine, name in ((self._consume(), "ingest"), (self._sweep_forever(), "sweep")):
            task = asyncio.create_task(coroutine, name=name)
            task.add_done_callback(self._task_ended)
            self._tasks.append(task)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("background task failed", task=task.get_name(), error=repr(task.exception()))
        self._failure = f"background task {task.get_name()!r} failed; see the log"

    async def stop(self) -> None:
        await self._subscriber.close()
        deadline = time.monotonic() + 1.0
        while self._buffer and time.monotonic() < deadline:
            await self._guarded(self._take())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._replays is not None:
            await self._replays.close()

    async def ingest_frame(self, frame: Frame) -> None:
        await self._guarded(frame)
        self._index_stats = await self._index.stats()

    # -- intake -----------------------------------------------------------------------

    def _submit(self, frame: Frame) -> None:
        """Buffers a live frame; never blocks (past the byte bound it is dropped, counted)."""
        size = len(frame.payload) + len(frame.topic) + _FRAME_OVERHEAD
        if self._buffer_bytes + size > self._settings.zmq.buffer_bytes:
            self._count_drop("buffer_full")
            pod = self._pod_of(frame)
            self._dropped_by_pod[pod] += 1
            if pod not in self._overflowed:
                self._overflowed.add(pod)
                log.warning("ingest buffer full: frames dropped", pod=pod)
                self._buffer.append(_Dropped(pod))
            return
        if self._overflowed:
            self._overflowed.discard(self._pod_of(frame))
        self._buffer.append(frame)
        self._buffer_bytes += size
        self._frames_waiting.set()

    @staticmethod
    def _pod_of(frame: Frame) -> str:
        return frame.source.pod_id or parse_topic(frame.topic)[0] or ""

    def _take(self) -> Frame | _Dropped:
        item = self._buffer.popleft()
        if isinstance(item, Frame):
            self._buffer_bytes -= len(item.payload) + len(item.topic) + _FRAME_OVERHEAD
        return item

    def _dropped(self, pod: str) -> None:
        """Frames of ``pod`` were dropped at this point of the buffer."""
        self._overflowed.discard(pod)
        streams = [s for p, s in self._sequencer.streams.items() if p.pod_id == pod]
        for stream in streams:
            self._sequencer.overflowed(stream)
        known = pod in self._unseen_overflows
        if not streams and (known or len(self._unseen_overflows) < _MAX_WARNED_TOPICS):
            # Its first frames were the ones dropped: its stream starts flagged.
            self._unseen_overflows[pod] += 1

    async def _consume(self) -> None:
        """Works through the buffer in slices of ``_SLICE_SECONDS`` between which queries
        run; while the oldest waiting frame is older than ``_BEHIND_SECONDS`` a slice may
        stretch to ``_MAX_SLICE_SECONDS``, so a stream of queries cannot starve ingestion."""
        while True:
            if not self._buffer:
                self._frames_waiting.clear()
                await self._frames_waiting.wait()
            start = time.perf_counter()
            soft_end, hard_end = start + _SLICE_SECONDS, start + _MAX_SLICE_SECONDS
            while self._buffer:
                frame = self._take()
                behind = (
                    isinstance(frame, Frame) and time.time() - frame.received >= _BEHIND_SECONDS
                )
                await self._guarded(frame)
                now = time.perf_counter()
                if now > hard_end or (now > soft_end and not behind):
                    break
            await asyncio.sleep(0)

    async def _guarded(self, frame: Frame | _Dropped) -> None:
        if isinstance(frame, _Dropped):
            self._dropped(frame.pod)
            return
        # A bug on one frame must not stop ingestion for good.
        try:
            await self._live(frame)
        except Exception:
            self._count_drop("internal_error")
            log.exception("frame not applied", topic=frame.topic.decode("utf-8", "replace"))

    # -- one frame --------------------------------------------------------------------

    async def _live(self, frame: Frame) -> None:
        if not _is_utf8(frame.topic):
            self._unidentified(frame)
            return
        topic_pod, topic_model = parse_topic(frame.topic)
        pod_id = frame.source.pod_id or topic_pod
        model = topic_model or frame.source.model
        if pod_id is None or model is None:
            self._unidentified(frame)
            return
        forgotten_at = self._forgotten.get(pod_id)
        if forgotten_at is not None:
            if frame.received <= forgotten_at:
                self._count_drop("pod_dropped")
                return
            del self._forgotten[pod_id]
        batch = self._applier.decode(frame.payload)
        rank = frame.source.rank
        if batch is not None and batch.data_parallel_rank is not None:
            rank = batch.data_parallel_rank
        self._batches["live"] += 1
        if rank >= _MAX_RANK:
            self._count_drop("limit")
            return
        pod = PodRank(pod_id, rank)
        self._models.get_or_add(model)
        stream = self._sequencer.streams.get(pod)
        if stream is None:
            stream = self._sequencer.streams[pod] = Stream(pod, model)
            log.info("pod seen", pod=str(pod), model=model, seq=frame.seq)
            if dropped := self._unseen_overflows.pop(pod_id, 0):
                stream.dropped += dropped
                stream.resync = True
        if stream.model != model:
            # The pod now serves another model (an IP reused by a new engine): what it held
            # for the old one is gone.
            log.warning("pod changed model", pod=str(pod), old=stream.model, new=model)
            await self._index.apply(stream.model, pod, [ClearPod()])
            stream.model = model
        stream.last_time = frame.received
        endpoint = frame.source.replay_endpoint or self._replay_endpoint_for(pod_id, rank)
        stream.replay_endpoint = endpoint
        await self._sequencer.live(stream, frame.seq, batch, endpoint, frame.received)

    def _replay_endpoint_for(self, pod_id: str, rank: int) -> str | None:
        endpoint = self._replay_endpoints.get(pod_id)
        if endpoint is None:
            return None
        try:
            return offset_port(endpoint, rank)
        except ValueError:
            return None

    def _count_drop(self, reason: str) -> None:
        self._applier.count_drop(reason)

    def _unidentified(self, frame: Frame) -> None:
        self._count_drop("unidentified")
        if frame.topic not in self._warned_topics and len(self._warned_topics) < _MAX_WARNED_TOPICS:
            self._warned_topics.add(frame.topic)
            log.warning(
                "batch names no pod or model; dropped",
                topic=frame.topic.decode("utf-8", "replace"),
                hint="set the engine's topic to kv@<pod-ip:port>@<model>, or list the pod"
                " under zmq.pods",
            )

    async def _sweep_forever(self) -> None:
        interval = self._settings.index.sweep_interval
        while True:
            await asyncio.sleep(interval)
            # Small steps, yielding between them, so queries never wait on a big expiry.
            for _ in range(_SWEEP_STEPS):
                if await self._index.sweep(_SWEEP_BUDGET) < _SWEEP_BUDGET:
                    break
                await asyncio.sleep(0)
            self._index_stats = await self._index.stats()

    # -- lookups ----------------------------------------------------------------------

    async def lookup(
        self,
        model: str,
        *,
        token_ids: Sequence[int] | None = None,
        block_hashes: Sequence[int] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Lookup:
        keying = self._models.get(model)
        if keying is None:
            return Lookup(None, 0 if token_ids is not None else len(block_hashes or ()), [])
        translator = keying.translator
        if token_ids is not None:
            keys = translator.query_keys(token_ids, lora_name=lora_name, cache_salt=cache_salt)
            total = len(keys)
        else:
            hashes = block_hashes or ()
            keys = translator.keys_of_engine_hashes(hashes)
            total = len(hashes)
        matches = await self._index.lookup(model, keys) if keys else []
        return Lookup(translator.block_size, total, score_pods(matches, total, self._weights))

    def block_size(self, model: str) -> int | None:
        keying = self._models.get(model)
        return None if keying is None else keying.translator.block_size

    # -- status -----------------------------------------------------------------------

    async def _snapshots(self) -> list[StreamSnapshot]:
        stats = await self._index.stats()
        return [
            stream.snapshot(stats.entries_by_pod.get((stream.model, pod), 0))
            for pod, stream in self._sequencer.streams.items()
        ]

    async def pods(self) -> list[PodStatus]:
        return pod_statuses(
            await self._snapshots(), stale_after=self._settings.zmq.stale_after, now=time.time()
        )

    def streams(self) -> list[StreamSnapshot]:
        by_pod = self._index_stats.entries_by_pod
        return [
            stream.snapshot(by_pod.get((stream.model, pod), 0))
            for pod, stream in self._sequencer.streams.items()
        ]

    async def models(self) -> list[ModelStatus]:
        stats = await self._index.stats()
        blocks: Counter[str] = Counter()
        for (model, _), count in stats.entries_by_pod.items():
            blocks[model] += count
        pods = Counter(stream.model for stream in self._sequencer.streams.values())
        return [
            ModelStatus(
                name=m.name,
                key_mode=m.translator.key_mode,
                configured=m.configured,
                block_size=m.translator.block_size,
                blocks=blocks[m.name],
                pods=pods[m.name],
                hash_matches=m.hash_matches,
                hash_mismatches=m.hash_mismatches,
            )
            for m in sorted(self._models.all(), key=lambda m: m.name)
        ]

    def warnings(self) -> list[str]:
        warnings = [
            f"model {m.name!r}: {m.hash_mismatches} engine block hashes differ from ours"
            " (check hash_algorithm and hash_seed / PYTHONHASHSEED)"
            for m in sorted(self._models.all(), key=lambda m: m.name)
            if m.hash_mismatches
        ]
        return warnings + stream_warnings(self.streams())

    def counts(self) -> PlaneCounts:
        stats = self._index_stats
        return PlaneCounts(
            events=dict(self._applier.events),
            drops=dict(self._applier.drops),
            batches=dict(self._batches),
            lag_buckets=LATENCY_BUCKETS,
            lag_counts=tuple(self._applier.lag_counts),
            lag_sum=self._applier.lag_sum,
            buffer_bytes=self._buffer_bytes,
            buffer_frames=len(self._buffer),
            buffer_max_bytes=self._settings.zmq.buffer_bytes,
            entries=stats.entries,
            evictions=dict(stats.evictions),
            dropped_by_pod=dict(self._dropped_by_pod),
            hash_mismatches={
                m.name: m.hash_mismatches for m in self._models.all() if m.hash_mismatches
            },
        )


def _is_utf8(topic: bytes) -> bool:
    with contextlib.suppress(UnicodeDecodeError):
        topic.decode("utf-8")
        return True
    return False
