"""The index protocol: what every backend (memory now, Redis/Valkey later) implements.

Operations are batch-first so a networked backend can serve each with one round trip:
``apply`` takes every operation of one event batch for one pod, ``lookup`` takes a whole
key chain for all (or some) pods.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.events.model import Tier

__all__ = [
    "EVICTION_REASONS",
    "BlockIndex",
    "ClearPod",
    "IndexOp",
    "IndexStats",
    "PodMatch",
    "PodRank",
    "RemoveBlocks",
    "StoreBlocks",
]

EVICTION_REASONS = ("removed", "cleared", "ttl", "capacity")


@dataclass(frozen=True, slots=True, order=True)
class PodRank:
    """One engine process: a pod, and its data-parallel rank (0 without data parallelism)."""

    pod_id: str
    dp_rank: int = 0

    def __str__(self) -> str:
        return self.pod_id if self.dp_rank == 0 else f"{self.pod_id}@dp{self.dp_rank}"


@dataclass(frozen=True, slots=True)
class StoreBlocks:
    """The pod now holds these blocks on ``tier`` (refreshes their TTL)."""

    keys: Sequence[int]
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class RemoveBlocks:
    """The pod no longer holds these blocks on ``tier``."""

    keys: Sequence[int]
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class ClearPod:
    """The pod holds nothing any more (AllBlocksCleared, or the engine restarted)."""


IndexOp = StoreBlocks | RemoveBlocks | ClearPod


@dataclass(frozen=True, slots=True)
class PodMatch:
    """How much of a key chain one pod holds.

    ``prefix_tiers`` maps a set of tiers (a bitmask of ``1 << Tier``) to the number of
    blocks of the matched prefix held on exactly that set, so callers can derive both
    per-tier counts and best-tier weights without another lookup.
    """

    pod: PodRank
    match_length: int
    block_count: int
    prefix_tiers: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Sizes and eviction counters, for metrics and ``/v1/pods``."""

    entries: int
    entries_by_pod: Mapping[tuple[str, PodRank], int]
    keys_by_model: Mapping[str, int]
    evictions: Mapping[str, int] = field(default_factory=dict)


class BlockIndex(Protocol):
    """Which pod holds which block of which model, on which tier."""

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        """Apply the operations of one event batch for one pod, in order."""
        ...

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        """Matches of a key chain for every pod holding any of its blocks (or only ``pods``).

        Pods holding none of the keys are left out.
        """
        ...

    async def drop_pod(self, pod_id: str) -> None:
        """Forget a pod entirely: every rank, every model."""
        ...

    async def sweep(self, budget: int | None = None) -> int:
        """Expire entries past their TTL and finish deferred clean-up; returns work done.

        ``budget`` bounds the keys visited in this call (None: until nothing is due).
        """
        ...

    async def stats(self) -> IndexStats:
        """Current sizes and cumulative evictions by reason."""
        ...
