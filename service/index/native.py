"""The native index (native/index.hpp) behind the ``BlockIndex`` protocol.

The native data plane writes and reads its table directly, from its own threads; this
wrapper exists so the conformance suite (tests/conformance) can hold the very same table to
the reference, call for call, and so a Python caller can use it on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from time import monotonic

from service import _dataplane
from service.index.protocol import (
    ClearPod,
    IndexOp,
    IndexStats,
    PodMatch,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
)

__all__ = ["NativeIndex"]


class NativeIndex:
    """``BlockIndex`` over ``service._dataplane.BlockIndex``; ``clock`` returns seconds."""

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if not 0 < ttl < float("inf"):
            raise ValueError(f"ttl must be positive and finite, got {ttl}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._table = _dataplane.BlockIndex(ttl, max_entries)
        self._clock = clock

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        now = self._clock()
        for op in ops:
            if isinstance(op, StoreBlocks):
                self._table.store(model, pod.pod_id, pod.dp_rank, list(op.keys), op.tier, now)
            elif isinstance(op, RemoveBlocks):
                self._table.remove(model, pod.pod_id, pod.dp_rank, list(op.keys), op.tier, now)
            elif isinstance(op, ClearPod):
                self._table.clear(model, pod.pod_id, pod.dp_rank)
        self._table.enforce_capacity()

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        wanted = None if pods is None else [(p.pod_id, p.dp_rank) for p in pods]
        return [
            PodMatch(PodRank(pod_id, rank), match_length, block_count, tier_sets)
            for pod_id, rank, match_length, block_count, tier_sets in self._table.lookup(
                model, list(keys), self._clock(), wanted
            )
        ]

    async def drop_pod(self, pod_id: str) -> None:
        self._table.drop_pod(pod_id)

    async def sweep(self, budget: int | None = None) -> int:
        swept: int = self._table.sweep(self._clock(), budget)
        return swept

    async def stats(self) -> IndexStats:
        stats = self._table.stats()
        return IndexStats(
            entries=stats["entries"],
            entries_by_pod={
                (model, PodRank(pod_id, rank)): n
                for (model, pod_id, rank), n in stats["entries_by_pod"].items()
            },
            keys_by_model=dict(stats["keys_by_model"]),
            evictions=dict(stats["evictions"]),
        )
