"""In-process index backend: one shard per model, packed per-pod fields, generation-based TTL.

Layout, chosen for lookup speed and memory (see docs/performance.md):

- Each pod rank of a model gets a *slot*. A block key maps to one Python int holding an
  8-bit field per slot at bit ``8 * slot``: bit 0 "held", bits 1-3 the tiers
  (``1 << (1 + Tier)``), bits 4-7 the generation of the last store, modulo 16.
  A lookup is then one dict probe per key for all pods, and the per-pod answers come from
  C-level passes (map/accumulate/sum) over those ints.
- Time is cut into generations of ``ttl / TTL_GENERATIONS``. Every store appends the key to
  the log of the current generation for its slot (a generation may have several logs, each
  slot's part of one at most ``_LOG_CHUNK`` keys). When a generation is older than the TTL,
  its log is replayed: an entry whose field still carries that generation was not re-stored
  since and expires. Capacity eviction replays the oldest logs early. So neither needs a
  scan of the index, and an entry lives at least ``ttl`` and at most ``ttl * 9 / 8``.
- Clearing a pod retires its slot at once (lookups mask it out) and wipes its fields in the
  background through the same logs; the slot is reused only once wiped.
"""

from __future__ import annotations

import heapq
from array import array
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from time import monotonic

from service.events.model import Tier
from service.index.buckets import ROUTE, ROUTE_MASK, new_buckets
from service.index.loops import (
    FIELD,
    GEN_SHIFT,
    HELD,
    TIERS,
    lookup_values,
    store_fields,
    summarize,
)
from service.index.protocol import (
    EVICTION_REASONS,
    ClearPod,
    IndexOp,
    IndexStats,
    PodMatch,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
)

__all__ = ["TTL_GENERATIONS", "MemoryIndex"]

TTL_GENERATIONS = 8
"""Generations per TTL: the TTL's resolution is ``ttl / TTL_GENERATIONS``."""

_GEN = 0xF0
_GEN_MOD = 16
# Pieces a retired slot's keys are cut into, so one sweep step stays short.
_WIPE_PIECE = 4096
# Most keys one slot's log of a generation holds before the generation gets another log:
# an array grows by ~6% at a time, and copying a multi-megabyte log on such a growth
# stalled ingest for milliseconds.
_LOG_CHUNK = 1 << 16
# If the sweeper fell this many generations behind, ``apply`` expires synchronously first,
# so generation numbers (kept modulo 16) can never alias.
_LAG_LIMIT = TTL_GENERATIONS + 4


def _tier_bit(tier: Tier) -> int:
    return 2 << tier


@dataclass(slots=True)
class _GenLog:
    """Keys stored during one generation, per slot (duplicates allowed)."""

    gen: int
    keys_by_slot: dict[int, array[int]] = field(default_factory=dict)


class _Shard:
    """Everything the index holds for one model."""

    __slots__ = (
        "by_route",
        "count",
        "free_slots",
        "holders",
        "live_mask",
        "log",
        "next_slot",
        "pod_of",
        "slot_of",
        "wipe",
        "wipe_pending",
    )

    def __init__(self) -> None:
        self.holders: list[dict[int, int]] = new_buckets()
        # holders[ROUTE[v]] for every routing value v: one subscript per key, not two.
        self.by_route: list[dict[int, int]] = [self.holders[bucket] for bucket in ROUTE]
        self.slot_of: dict[PodRank, int] = {}
        self.pod_of: dict[int, PodRank] = {}
        self.count: dict[int, int] = {}
        self.live_mask = 0
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.log: deque[_GenLog] = deque()
        self.wipe: deque[tuple[int, array[int]]] = deque()
        self.wipe_pending: dict[int, int] = {}

    def slot(self, pod: PodRank) -> int:
        slot = self.slot_of.get(pod)
        if slot is None:
            if self.free_slots:
                slot = heapq.heappop(self.free_slots)
            else:
                slot = self.next_slot
                self.next_slot += 1
            self.slot_of[pod] = slot
            self.pod_of[slot] = pod
            self.count[slot] = 0
            self.live_mask |= HELD << (8 * slot)
        return slot

    def retire(self, pod: PodRank) -> int:
        """Forget a pod's slot now; queue its fields for wiping. Returns its entry count."""
        slot = self.slot_of.pop(pod, None)
        if slot is None:
            return 0
        del self.pod_of[slot]
        entries = self.count.pop(slot)
        self.live_mask &= ~(HELD << (8 * slot))
        pieces = 0
        for gen_log in self.log:
            keys = gen_log.keys_by_slot.pop(slot, None)
            if keys is None:
                continue
            for start in range(0, len(keys), _WIPE_PIECE):
                self.wipe.append((slot, keys[start : start + _WIPE_PIECE]))
                pieces += 1
        if pieces:
            self.wipe_pending[slot] = pieces
        else:
            heapq.heappush(self.free_slots, slot)
        return entries


class MemoryIndex:
    """The in-memory ``BlockIndex``: sharded by model, TTL per (block, pod), size-bounded.

    ``max_entries`` bounds (block, pod) entries across all models; beyond it the coldest
    generations are evicted first. ``clock`` returns seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._generation_seconds = ttl / TTL_GENERATIONS
        self._max_entries = max_entries
        self._clock = clock
        self._shards: dict[str, _Shard] = {}
        self._entries = 0
        self._evictions: Counter[str] = Counter(dict.fromkeys(EVICTION_REASONS, 0))

    # -- writes -------------------------------------------------------------------------

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        now_gen = self._generation()
        shard = self._shards.get(model)
        if shard is None:
            shard = self._shards[model] = _Shard()
        if shard.log and shard.log[0].gen < now_gen - _LAG_LIMIT:
            self._expire(shard, now_gen, budget=None)
        for op in ops:
            if isinstance(op, StoreBlocks):
                self._store(shard, shard.slot(pod), op.keys, op.tier, now_gen)
            elif isinstance(op, RemoveBlocks):
                if pod in shard.slot_of:
                    self._remove(shard, shard.slot_of[pod], op.keys, op.tier)
            elif isinstance(op, ClearPod):
                self._clear(shard, pod)
        if self._entries > self._max_entries:
            self._evict_to_capacity()

    def _store(
        self, shard: _Shard, slot: int, keys: Sequence[int], tier: Tier, now_gen: int
    ) -> None:
        gen_bits = (now_gen % _GEN_MOD) << GEN_SHIFT
        added, to_log = store_fields(
            shard.by_route, ROUTE_MASK, keys, 8 * slot, _tier_bit(tier), gen_bits
        )
        self._log_for(shard, slot, now_gen).extend(to_log)
        shard.count[slot] += added
        self._entries += added

    def _remove(self, shard: _Shard, slot: int, keys: Iterable[int], tier: Tier) -> None:
        by_route = shard.by_route
        shift = 8 * slot
        tier_bit = _tier_bit(tier)
        removed = 0
        for key in keys:
            bucket = by_route[key & ROUTE_MASK]
            value = bucket.get(key)
            if value is None:
                continue
            old = (value >> shift) & FIELD
            if not old & tier_bit:
                continue
            new = old & ~tier_bit
            if not new & TIERS:
                new = 0
                removed += 1
            value ^= (old ^ new) << shift
            if value:
                bucket[key] = value
            else:
                del bucket[key]
        shard.count[slot] -= removed
        self._entries -= removed
        self._evictions["removed"] += removed

    def _clear(self, shard: _Shard, pod: PodRank) -> None:
        entries = shard.retire(pod)
        self._entries -= entries
        self._evictions["cleared"] += entries

    def _log_for(self, shard: _Shard, slot: int, now_gen: int) -> array[int]:
        if not shard.log or shard.log[-1].gen != now_gen:
            shard.log.append(_GenLog(now_gen))
        by_slot = shard.log[-1].keys_by_slot
        keys = by_slot.get(slot)
        if keys is not None and len(keys) >= _LOG_CHUNK:
            shard.log.append(_GenLog(now_gen))  # same generation, another log
            by_slot, keys = shard.log[-1].keys_by_slot, None
        if keys is None:
            keys = by_slot[slot] = array("Q")
        return keys

    async def drop_pod(self, pod_id: str) -> None:
        for shard in self._shards.values():
            for pod in [p for p in shard.slot_of if p.pod_id == pod_id]:
                self._clear(shard, pod)

    # -- expiry and eviction --------------------------------------------------------------

    async def sweep(self, budget: int | None = None) -> int:
        now_gen = self._generation()
        done = 0
        for shard in self._shards.values():
            remaining = None if budget is None else budget - done
            if remaining is not None and remaining <= 0:
                break
            done += self._wipe_retired(shard, remaining)
            remaining = None if budget is None else budget - done
            if remaining is not None and remaining <= 0:
                break
            done += self._expire(shard, now_gen, remaining)
        for model in [m for m, s in self._shards.items() if self._is_empty(s)]:
            del self._shards[model]
        return done

    @staticmethod
    def _is_empty(shard: _Shard) -> bool:
        return not any(shard.holders) and not shard.slot_of and not shard.wipe

    def _expire(self, shard: _Shard, now_gen: int, budget: int | None) -> int:
        """Replay the logs of generations older than the TTL; returns keys visited."""
        visited = 0
        while shard.log and shard.log[0].gen < now_gen - TTL_GENERATIONS:
            remaining = None if budget is None else budget - visited
            if remaining is not None and remaining <= 0:
                break
            seen, _ = self._drain_oldest(shard, "ttl", remaining, None)
            visited += seen
        return visited

    def _evict_to_capacity(self) -> None:
        while self._entries > self._max_entries:
            oldest = min(
                (s for s in self._shards.values() if s.log),
                key=lambda s: s.log[0].gen,
                default=None,
            )
            if oldest is None:
                return
            self._drain_oldest(oldest, "capacity", None, self._entries - self._max_entries)

    def _drain_oldest(
        self, shard: _Shard, reason: str, max_keys: int | None, max_evictions: int | None
    ) -> tuple[int, int]:
        """Evict entries still carrying the oldest logged generation; drop the log when done.

        Stops early after ``max_keys`` keys or ``max_evictions`` evictions, keeping the
        unvisited rest of the log for later. Returns (keys visited, entries evicted).
        """
        gen_log = shard.log[0]
        gen_bits = (gen_log.gen % _GEN_MOD) << GEN_SHIFT
        by_route = shard.by_route
        visited = evicted = 0
        by_slot = gen_log.keys_by_slot
        while by_slot:
            if max_keys is not None and visited >= max_keys:
                break
            if max_evictions is not None and evicted >= max_evictions:
                break
            slot, keys = next(iter(by_slot.items()))
            shift = 8 * slot
            keep = ~(FIELD << shift)
            stop = len(keys) if max_keys is None else min(len(keys), max_keys - visited)
            wanted = None if max_evictions is None else max_evictions - evicted
            slot_evicted = index = 0
            while index < stop:
                key = keys[index]
                index += 1
                bucket = by_route[key & ROUTE_MASK]
                value = bucket.get(key)
                if value is None:
                    continue
                old = (value >> shift) & FIELD
                if old & HELD and old & _GEN == gen_bits:
                    value &= keep
                    if value:
                        bucket[key] = value
                    else:
                        del bucket[key]
                    slot_evicted += 1
                    if slot_evicted == wanted:
                        break
            visited += index
            evicted += slot_evicted
            shard.count[slot] -= slot_evicted
            if index < len(keys):
                by_slot[slot] = keys[index:]
            else:
                del by_slot[slot]
        if not by_slot:
            shard.log.popleft()
        self._entries -= evicted
        self._evictions[reason] += evicted
        return visited, evicted

    def _wipe_retired(self, shard: _Shard, budget: int | None) -> int:
        by_route = shard.by_route
        visited = 0
        while shard.wipe and (budget is None or visited < budget):
            slot, keys = shard.wipe.popleft()
            mask = ~(FIELD << (8 * slot))
            for key in keys:
                bucket = by_route[key & ROUTE_MASK]
                value = bucket.get(key)
                if value is None:
                    continue
                value &= mask
                if value:
                    bucket[key] = value
                else:
                    del bucket[key]
            visited += len(keys)
            shard.wipe_pending[slot] -= 1
            if not shard.wipe_pending[slot]:
                del shard.wipe_pending[slot]
                heapq.heappush(shard.free_slots, slot)
        return visited

    def _generation(self) -> int:
        return int(self._clock() // self._generation_seconds)

    # -- reads ----------------------------------------------------------------------------

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        shard = self._shards.get(model)
        if shard is None or not keys:
            return []
        if pods is None:
            slots = shard.pod_of
        else:
            slots = {shard.slot_of[p]: p for p in pods if p in shard.slot_of}
        if not slots:
            return []
        values = lookup_values(shard.by_route, ROUTE_MASK, keys)
        summaries = summarize(values, list(slots))
        return [
            PodMatch(pod, match_length, block_count, tier_sets)
            for pod, (match_length, block_count, tier_sets) in zip(
                slots.values(), summaries, strict=True
            )
            if block_count
        ]

    async def stats(self) -> IndexStats:
        by_pod = {
            (model, pod): shard.count[slot]
            for model, shard in self._shards.items()
            for pod, slot in shard.slot_of.items()
        }
        keys = {model: sum(map(len, shard.holders)) for model, shard in self._shards.items()}
        return IndexStats(self._entries, by_pod, keys, dict(self._evictions))
