"""Per (pod, DP rank) sequencing and replay: the Python data plane's, and the reference the
native one (native/plane.cpp, DataPlane::sequence) follows.

CONTRACT.md section 6:
- first contact with a pod that has a replay endpoint: replay from 0;
- a gap: replay from last + 1 when a replay endpoint is known, else count the loss;
- a sequence lower than expected: the engine restarted: clear the pod, then replay from 0.
While a replay runs, that stream's live frames wait in order (bounded; overflow counted as
``replay_buffer_full``) and apply after it; replayed batches already applied are skipped by
sequence number. A failed replay applies the waiting frames; its gap is then a loss. A
replay that leaves a gap before a held frame (frames dropped after the engine answered), or
that ran while frames were dropped, is followed by another from where the stream stands,
until ``MAX_IDLE_REPLAYS`` in a row bring nothing new.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from service.dataplane.registry import StreamSnapshot
from service.dataplane.replays import ReplayRunner
from service.events.model import EventBatch
from service.events.replay import ReplayedBatch
from service.index.protocol import PodRank

__all__ = ["MAX_PENDING", "Stream", "StreamSequencer"]

log = structlog.get_logger("kv_cache.ingest")

MAX_PENDING = 10_000
"""Live frames one stream may hold while its replay runs."""

MAX_IDLE_REPLAYS = 2
"""Replays in a row that may bring nothing new before a gap counts as lost."""

# A replay's batches are applied in slices of this long, between which queries run.
_SLICE_SECONDS = 0.0005

Decoded = EventBatch | None
"""A decoded batch, or None for one that did not decode (already counted)."""


@dataclass(slots=True)
class Stream:
    """Sequence state of one engine process (a pod's dp rank)."""

    pod: PodRank
    model: str
    last_seq: int | None = None
    last_time: float | None = None
    lag: float = 0.0
    batches: int = 0
    gaps: int = 0
    lost: int = 0
    replays: int = 0
    restarts: int = 0
    dropped: int = 0
    replaying: bool = False
    resync: bool = False
    replayed_through: int | None = None
    """The last sequence number a replay applied: live frames at or below it, stamped no
    later than ``replayed_ts``, are duplicates queued behind the replay, not a restart."""
    replayed_ts: float = 0.0
    replay_applied_at: float = 0.0
    replay_endpoint: str | None = None
    dropped_in_replay: bool = False
    """Frames were dropped while a replay ran: it may have answered before they were sent."""
    idle_replays: int = 0
    """Replays in a row that brought nothing new: past MAX_IDLE_REPLAYS a gap is a loss."""
    pending: list[tuple[int, Decoded]] = field(default_factory=list)

    def snapshot(self, blocks: int) -> StreamSnapshot:
        return StreamSnapshot(
            pod_id=self.pod.pod_id,
            dp_rank=self.pod.dp_rank,
            model=self.model,
            blocks=blocks,
            replaying=self.replaying,
            resync=self.resync,
            last_seq=self.last_seq,
            last_time=self.last_time,
            lag=self.lag,
            batches=self.batches,
            gaps=self.gaps,
            lost=self.lost,
            replays=self.replays,
            restarts=self.restarts,
            dropped=self.dropped,
        )


Apply = Callable[[Stream, EventBatch, bool], Awaitable[None]]
"""Applies a decoded batch's events for a stream; the flag says it is live (not replayed)."""
Clear = Callable[[Stream], Awaitable[None]]
Decode = Callable[[bytes], Decoded]


class StreamSequencer:
    """Orders each stream's batches and starts replays; applies through callbacks."""

    def __init__(
        self,
        *,
        apply: Apply,
        clear: Clear,
        decode: Decode,
        replays: ReplayRunner | None,
        count_drop: Callable[[str], None],
        count_replayed: Callable[[], None],
    ) -> None:
        self._apply_events = apply
        self._clear = clear
        self._decode = decode
        self._replays = replays
        self._count_drop = count_drop
        self._count_replayed = count_replayed
        self.streams: dict[PodRank, Stream] = {}

    def is_current(self, stream: Stream) -> bool:
        """Whether the stream is still tracked (not forgotten meanwhile)."""
        return self.streams.get(stream.pod) is stream

    async def live(
        self,
        stream: Stream,
        seq: int,
        batch: Decoded,
        replay_endpoint: str | None,
        received: float,
    ) -> None:
        """A live frame of ``stream``: held while it replays, else sequenced."""
        if stream.replaying:
            self._hold(stream, seq, batch)
            return
        await self.sequence(stream, seq, batch, replay_endpoint, received=received)

    async def sequence(
        self,
        stream: Stream,
        seq: int,
        batch: Decoded,
        replay_endpoint: str | None,
        *,
        gap_counted: bool = False,
        received: float = 0.0,
    ) -> None:
        can_replay = replay_endpoint is not None and self._replays is not None
        last = stream.last_seq
        if last is None:
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, 0, (seq, batch))
        elif seq > last + 1:
            if not gap_counted:
                stream.gaps += 1
                log.warning("sequence gap", pod=str(stream.pod), expected=last + 1, got=seq)
            stream.resync = False
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, last + 1, (seq, batch))
            stream.lost += seq - last - 1
        elif seq <= last:
            # A batch the replay already brought, still in flight or queued when it
            # answered: the engine stamped it no later than the last one replayed. A
            # restarted engine starts its numbers again, but its batches are newer.
            if self._replayed_already(stream, seq, batch, received):
                return
            stream.restarts += 1
            log.warning("engine restarted", pod=str(stream.pod), last_seq=last, seq=seq)
            await self._clear(stream)
            stream.last_seq = None
            stream.resync = False
            if can_replay:
                assert replay_endpoint is not None
                return self._start_replay(stream, replay_endpoint, 0, (seq, batch))
        await self._apply(stream, seq, batch, live=True)

    @staticmethod
    def _replayed_already(stream: Stream, seq: int, batch: Decoded, received: float) -> bool:
        if stream.replayed_through is None or seq > stream.replayed_through:
            return False
        if batch is not None:
            return batch.ts <= stream.replayed_ts
        return received <= stream.replay_applied_at

    def overflowed(self, stream: Stream) -> None:
        """Frames of the stream were dropped: replay from where it stands where possible,
        else flag it until a gap settles it."""
        stream.dropped += 1
        if stream.replaying:
            stream.dropped_in_replay = True
            return
        endpoint = stream.replay_endpoint
        if endpoint is not None and self._replays is not None and stream.last_seq is not None:
            self._start_replay(stream, endpoint, stream.last_seq + 1, None)
        else:
            stream.resync = True

    def _start_replay(
        self, stream: Stream, endpoint: str, start: int, held: tuple[int, Decoded] | None
    ) -> None:
        assert self._replays is not None
        stream.replaying = True
        stream.replays += 1
        stream.replay_endpoint = endpoint
        stream.dropped_in_replay = False
        if held is not None:
            self._hold(stream, *held)

        async def done(batches: list[ReplayedBatch], ok: bool) -> None:
            again = False
            try:
                again = await self._apply_replay(stream, batches, ok)
            finally:
                stream.replaying = again

        self._replays.start(str(stream.pod), endpoint, start, done)

    async def _apply_replay(self, stream: Stream, replayed: list[ReplayedBatch], ok: bool) -> bool:
        """Replayed batches, then the live frames held meanwhile. Yields to the loop between
        slices, and stops if the stream was forgotten meanwhile. True when it started another
        replay: frames dropped after the engine answered leave a gap this one cannot fill."""
        slice_end = time.perf_counter() + _SLICE_SECONDS
        applied = 0
        for item in replayed:
            if not self.is_current(stream):
                return False
            last = stream.last_seq
            if last is not None and item.seq <= last:
                continue
            if last is not None and item.seq > last + 1:
                stream.lost += item.seq - last - 1
            self._count_replayed()
            batch = self._decode(item.payload)
            await self._apply(stream, item.seq, batch, live=False)
            applied += 1
            stream.replayed_through = item.seq
            if batch is not None:
                stream.replayed_ts = max(stream.replayed_ts, batch.ts)
            if time.perf_counter() > slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_SECONDS
        stream.idle_replays = 0 if applied else stream.idle_replays + 1
        endpoint = stream.replay_endpoint
        replay_again = ok and endpoint is not None and stream.idle_replays < MAX_IDLE_REPLAYS
        # Live frames sent before the engine answered may still be queued behind this; they
        # carry sequence numbers at or below what the replay brought, and are not a restart.
        stream.replay_applied_at = time.time()
        # The first held frame is the one that started the replay: its gap was counted then.
        # A frame numbered below the one before it is an engine restart, never a duplicate.
        previous: int | None = None
        first = True
        while stream.pending:
            if not self.is_current(stream):
                return False
            seq, batch = stream.pending[0]
            restarted = previous is not None and seq < previous
            previous = seq
            last = stream.last_seq
            if not restarted and last is not None and seq <= last:
                stream.pending.pop(0)
                first = False
                continue  # the replay already brought it
            if replay_again and not restarted and last is not None and seq > last + 1:
                assert endpoint is not None
                if not first:
                    stream.gaps += 1
                return self._replay_again(stream, endpoint, last + 1)
            stream.pending.pop(0)
            await self.sequence(stream, seq, batch, None, gap_counted=first)
            first = False
            if time.perf_counter() > slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_SECONDS
        if stream.dropped_in_replay and replay_again and stream.last_seq is not None:
            assert endpoint is not None
            return self._replay_again(stream, endpoint, stream.last_seq + 1)
        return False

    def _replay_again(self, stream: Stream, endpoint: str, start: int) -> bool:
        log.info("replaying again", pod=str(stream.pod), start=start)
        self._start_replay(stream, endpoint, start, None)
        return True

    def _hold(self, stream: Stream, seq: int, batch: Decoded) -> None:
        if len(stream.pending) >= MAX_PENDING:
            self._count_drop("replay_buffer_full")
            return
        stream.pending.append((seq, batch))

    async def _apply(self, stream: Stream, seq: int, batch: Decoded, *, live: bool) -> None:
        stream.last_seq = seq
        stream.batches += 1
        if batch is None or not batch.events:
            return
        await self._apply_events(stream, batch, live)
