"""The engine streams a data plane tracks, as ``/v1/pods``, readiness and metrics show them.

Both data planes describe their streams as ``StreamSnapshot``s; everything an operator sees
of them is derived here, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.status import PodState, PodStatus

__all__ = ["StreamSnapshot", "pod_statuses", "stream_warnings"]


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    """One (pod, DP rank) engine stream, as its data plane last saw it."""

    pod_id: str
    dp_rank: int
    model: str
    blocks: int
    replaying: bool
    resync: bool
    """Frames of it were dropped (the ingest buffer was full) and not yet recovered."""
    last_seq: int | None
    last_time: float | None
    """Unix seconds when its last frame arrived."""
    lag: float
    """Now minus the engine timestamp of its last live batch, when that batch applied."""
    batches: int
    gaps: int
    lost: int
    replays: int
    restarts: int
    dropped: int
    """Times frames of it were dropped because the ingest buffer was full."""


def _state(stream: StreamSnapshot, stale_after: float, now: float) -> PodState:
    if stream.replaying:
        return "replaying"
    if stream.resync or stream.last_time is None or now - stream.last_time > stale_after:
        return "stale"
    return "live"


def pod_statuses(
    streams: Iterable[StreamSnapshot], *, stale_after: float, now: float
) -> list[PodStatus]:
    """``/v1/pods``: sorted by pod id, then rank."""
    return [
        PodStatus(
            pod_id=s.pod_id,
            dp_rank=s.dp_rank,
            model=s.model,
            blocks=s.blocks,
            state=_state(s, stale_after, now),
            last_event_time=s.last_time,
            last_seq=s.last_seq,
            batches=s.batches,
            gaps=s.gaps,
            lost_batches=s.lost,
            replays=s.replays,
            restarts=s.restarts,
            dropped=s.dropped,
        )
        for s in sorted(streams, key=lambda s: (s.pod_id, s.dp_rank))
    ]


def stream_warnings(streams: Iterable[StreamSnapshot]) -> list[str]:
    """Readiness warnings: pods whose dropped frames nothing has recovered yet."""
    return [
        f"pod {s.pod_id!r} rank {s.dp_rank}: frames dropped (ingest buffer full, see"
        " zmq.buffer_bytes) and no replay endpoint to recover them; its entries may be"
        " incomplete until its next gap, clear or restart"
        for s in sorted(streams, key=lambda s: (s.pod_id, s.dp_rank))
        if s.resync
    ]
