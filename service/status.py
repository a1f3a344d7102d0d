"""What the service tracks, as ``/v1/pods`` and ``/v1/models`` report it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["ModelStatus", "PodState", "PodStatus", "Readiness", "StatusSource"]

PodState = Literal["live", "replaying", "stale"]


@dataclass(frozen=True, slots=True)
class PodStatus:
    """One engine stream: a (pod, data-parallel rank) publishing for a model."""

    pod_id: str
    dp_rank: int
    model: str | None
    blocks: int
    state: PodState
    last_event_time: float | None  # unix seconds when its last batch arrived
    last_seq: int | None
    batches: int
    gaps: int
    lost_batches: int
    replays: int
    restarts: int
    dropped: int = 0
    """Times its frames were dropped because the ingest buffer was full."""


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model: configured, or first seen in events (then with the default settings)."""

    name: str
    key_mode: str
    configured: bool
    block_size: int | None
    blocks: int
    pods: int
    hash_matches: int
    hash_mismatches: int


@dataclass(frozen=True, slots=True)
class Readiness:
    """``/readyz``: ``ready`` is False only when the service cannot answer at all."""

    ready: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class StatusSource(Protocol):
    async def pods(self) -> list[PodStatus]: ...
    async def models(self) -> list[ModelStatus]: ...
    async def readiness(self) -> Readiness: ...
