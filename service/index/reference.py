"""The reference ``BlockIndex``: the protocol's semantics, written the obvious way.

This is the index every other backend (the native table, Redis, Redis Cluster) is held to:
``tests/conformance/`` runs random event streams through a backend and through this class
side by side and compares every answer. So it is written to be read and checked against
the docstrings of ``service/index/protocol.py`` line by line, not to be fast: plain dicts,
an ``OrderedDict`` per pod for its store order, and whole-index scans for capacity
eviction and sweeps (O(holders) each). Clear enough to be obviously right; never the one
to serve traffic with.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import assert_never

from service.events.model import Tier
from service.index.protocol import (
    EVICTION_REASONS,
    MAX_COPIES,
    ClearPod,
    IndexOp,
    IndexStats,
    PodMatch,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
    tick_of,
    ttl_ticks,
)

__all__ = ["ReferenceIndex"]

_Where = tuple[str, PodRank, int]
"""A holder's address: (model, pod, key)."""

_ColdKey = tuple[int, str, str, int, int]
"""A holder's place in the coldest-first order: (stamp, model, pod_id, dp_rank, position)."""


@dataclass(slots=True)
class _Holder:
    """One pod's copies of one block, per tier, and the tick of its last store."""

    stamp: int
    copies: list[int] = field(default_factory=lambda: [0] * len(Tier))

    def tiers(self) -> int:
        """The set of tiers holding a copy, as a bitmask of ``1 << Tier``."""
        return sum(1 << tier for tier in Tier if self.copies[tier] > 0)


class ReferenceIndex:
    """The ``BlockIndex`` semantics, plainly. ``clock`` returns seconds (injectable)."""

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if not 0 < ttl < math.inf:
            raise ValueError(f"ttl must be positive and finite, got {ttl}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._ttl_ticks = ttl_ticks(ttl)
        self._max_entries = max_entries
        self._clock = clock
        # (model, pod) -> key -> holder, least recently stored first. No empty inner maps.
        self._pods: dict[tuple[str, PodRank], OrderedDict[int, _Holder]] = {}
        self._evictions: Counter[str] = Counter(dict.fromkeys(EVICTION_REASONS, 0))

    # -- writes ---------------------------------------------------------------------------

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        now = tick_of(self._clock())
        for op in ops:
            if isinstance(op, StoreBlocks):
                for key in op.keys:
                    self._store(model, pod, key, op.tier, now)
            elif isinstance(op, RemoveBlocks):
                for key in op.keys:
                    self._remove(model, pod, key, op.tier, now)
            elif isinstance(op, ClearPod):
                self._clear(model, pod)
            else:
                assert_never(op)
        self._evict_to_capacity()

    def _store(self, model: str, pod: PodRank, key: int, tier: Tier, now: int) -> None:
        holder = self._holder(model, pod, key)
        if holder is not None and self._is_expired(holder, now):
            self._delete((model, pod, key), "ttl")
            holder = None
        holders = self._pods.setdefault((model, pod), OrderedDict())
        if holder is None:
            holder = holders[key] = _Holder(stamp=now)
        holder.copies[tier] = min(MAX_COPIES, holder.copies[tier] + 1)
        holder.stamp = now
        holders.move_to_end(key)

    def _remove(self, model: str, pod: PodRank, key: int, tier: Tier, now: int) -> None:
        holder = self._holder(model, pod, key)
        if holder is None or self._is_expired(holder, now) or holder.copies[tier] == 0:
            return
        if holder.copies[tier] < MAX_COPIES:
            holder.copies[tier] -= 1
        if not any(holder.copies):
            self._delete((model, pod, key), "removed")

    def _clear(self, model: str, pod: PodRank) -> None:
        holders = self._pods.pop((model, pod), None)
        if holders is not None:
            self._evictions["cleared"] += len(holders)

    async def drop_pod(self, pod_id: str) -> None:
        for model, pod in [where for where in self._pods if where[1].pod_id == pod_id]:
            self._clear(model, pod)

    # -- expiry and eviction --------------------------------------------------------------

    async def sweep(self, budget: int | None = None) -> int:
        now = tick_of(self._clock())
        expired = sorted(
            (cold_key, where)
            for cold_key, where in self._coldest_first()
            if self._is_expired(self._holder_at(where), now)
        )
        if budget is not None:
            expired = expired[: max(0, budget)]
        for _, where in expired:
            self._delete(where, "ttl")
        return len(expired)

    def _evict_to_capacity(self) -> None:
        while self._entries() > self._max_entries:
            _, coldest = min(self._coldest_first())
            self._delete(coldest, "capacity")

    def _is_expired(self, holder: _Holder, now: int) -> bool:
        return now - holder.stamp >= self._ttl_ticks

    def _coldest_first(self) -> Iterator[tuple[_ColdKey, _Where]]:
        """Every holder with its place in the coldest-first order (unsorted)."""
        for (model, pod), holders in self._pods.items():
            for position, (key, holder) in enumerate(holders.items()):
                cold_key = (holder.stamp, model, pod.pod_id, pod.dp_rank, position)
                yield cold_key, (model, pod, key)

    def _delete(self, where: _Where, reason: str) -> None:
        model, pod, key = where
        holders = self._pods[(model, pod)]
        del holders[key]
        if not holders:
            del self._pods[(model, pod)]
        self._evictions[reason] += 1

    def _holder(self, model: str, pod: PodRank, key: int) -> _Holder | None:
        holders = self._pods.get((model, pod))
        return None if holders is None else holders.get(key)

    def _holder_at(self, where: _Where) -> _Holder:
        model, pod, key = where
        return self._pods[(model, pod)][key]

    def _entries(self) -> int:
        return sum(len(holders) for holders in self._pods.values())

    # -- reads ----------------------------------------------------------------------------

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        now = tick_of(self._clock())
        wanted = None if pods is None else set(pods)
        matches = []
        for holder_model, pod in sorted(self._pods):
            if holder_model != model or (wanted is not None and pod not in wanted):
                continue
            holders = self._pods[(holder_model, pod)]
            held = [holders.get(key) for key in keys]
            live = [h if h is not None and not self._is_expired(h, now) else None for h in held]
            block_count = sum(h is not None for h in live)
            if block_count == 0:
                continue
            match_length = next((i for i, h in enumerate(live) if h is None), len(live))
            prefix_tiers = Counter(h.tiers() for h in live[:match_length] if h is not None)
            matches.append(PodMatch(pod, match_length, block_count, dict(prefix_tiers)))
        return matches

    async def stats(self) -> IndexStats:
        keys_by_model: dict[str, set[int]] = {}
        for (model, _), holders in self._pods.items():
            keys_by_model.setdefault(model, set()).update(holders)
        return IndexStats(
            entries=self._entries(),
            entries_by_pod={where: len(holders) for where, holders in self._pods.items()},
            keys_by_model={model: len(keys) for model, keys in keys_by_model.items()},
            evictions=dict(self._evictions),
        )
