"""The index protocol: what every backend (reference, native, Redis/Valkey) implements.

Operations are batch-first so a networked backend can serve each with one round trip:
``apply`` takes every operation of one event batch for one pod, ``lookup`` takes a whole
key chain for all (or some) pods.

The data model, which every implementation must follow exactly (``ReferenceIndex`` in
``service/index/reference.py`` is the executable statement of it, and
``tests/conformance/`` holds every backend to it):

- A *holder* is one engine process holding one block: ``(model, PodRank, key)``, the key an
  unsigned 64-bit int. A holder counts its *copies* per tier (GPU, CPU, disk), each
  ``0..MAX_COPIES``, because vLLM does not de-duplicate cached blocks: two requests
  prefilling the same prefix at once each cache their own copy under one hash, and each
  copy's eviction sends its own ``BlockRemoved`` (vllm/v1/core/block_pool.py,
  ``BlockHashToBlockMap``, "NOTE #1"). A holder exists while some tier has a copy.
- Time is counted in *ticks*: ``tick_of(clock())``, ``TICKS_PER_SECOND`` to the second.
  A holder's *stamp* is the tick of its last store. With ``ttl_ticks(ttl)`` ticks of TTL, a
  holder is *expired* when ``now_tick - stamp >= ttl_ticks``. Expired holders are invisible
  to lookups at once, and stay counted in ``stats`` until deleted (by ``sweep``, a store,
  a clear or capacity eviction).
- Each (model, pod) keeps its holders in *store order*: a store moves the holder to the
  most recent end. The *coldest-first order* over the whole index sorts holders by
  ``(stamp, model, pod_id, dp_rank, position in store order)``; strings compare by code
  point (the same as UTF-8 byte order). Capacity eviction and ``sweep`` both take holders
  in this order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from service.events.model import Tier

__all__ = [
    "EVICTION_REASONS",
    "MAX_COPIES",
    "TICKS_PER_SECOND",
    "BlockIndex",
    "ClearPod",
    "IndexOp",
    "IndexStats",
    "PodMatch",
    "PodRank",
    "RemoveBlocks",
    "StoreBlocks",
    "tick_of",
    "ttl_ticks",
]

EVICTION_REASONS = ("removed", "cleared", "ttl", "capacity")

TICKS_PER_SECOND: Final = 16
"""The index's clock resolution: stamps and TTLs are whole sixteenths of a second."""

MAX_COPIES: Final = 255
"""Copies a holder counts per tier. A count that reaches it is saturated: it stays there."""


def tick_of(seconds: float) -> int:
    """The tick a clock reading falls in: ``floor(seconds * TICKS_PER_SECOND)``."""
    return math.floor(seconds * TICKS_PER_SECOND)


def ttl_ticks(ttl: float) -> int:
    """A TTL in seconds as whole ticks, rounded up, at least one."""
    return max(1, math.ceil(ttl * TICKS_PER_SECOND))


@dataclass(frozen=True, slots=True, order=True)
class PodRank:
    """One engine process: a pod, and its data-parallel rank (0 without data parallelism)."""

    pod_id: str
    dp_rank: int = 0

    def __str__(self) -> str:
        return self.pod_id if self.dp_rank == 0 else f"{self.pod_id}@dp{self.dp_rank}"


@dataclass(frozen=True, slots=True)
class StoreBlocks:
    """The pod cached one more copy of each of these blocks on ``tier`` (BlockStored).

    A key listed twice is two copies. A store refreshes the holder's stamp.
    """

    keys: Sequence[int]
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class RemoveBlocks:
    """The pod evicted one copy of each of these blocks from ``tier`` (BlockRemoved)."""

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
    per-tier counts and best-tier weights without another lookup. It has no zero counts.
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
    """Which pod holds how many copies of which block of which model, on which tier.

    See the module docstring for holders, copies, ticks and the coldest-first order.
    All implementations must:

    - take ``ttl`` (seconds, > 0), ``max_entries`` (> 0) and ``clock`` (a callable giving
      seconds, injected so tests drive time) at construction, and assume the clock never
      goes back;
    - read the clock once per call: every operation of one ``apply`` sees the same tick;
    - keep every method async, and stay consistent when calls come from several tasks
      (a lookup racing an ``apply`` may see part of it, never a corrupt state). Calls for
      one pod come in order from one task; an implementation applies them in that order;
    - count evictions by reason, cumulatively: ``removed``, ``cleared``, ``ttl``,
      ``capacity`` (``EVICTION_REASONS``); one holder deleted counts once, whatever its
      copies.
    """

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        """Apply the operations of one event batch for one pod, in order.

        All implementations must apply, key by key in list order:

        - ``StoreBlocks(keys, tier)``: an expired holder is deleted first (``ttl``) and
          treated as absent; an absent holder is created with no copies; then
          ``copies[tier] = min(MAX_COPIES, copies[tier] + 1)``, the stamp becomes now, and
          the holder moves to the most recent end of its pod's store order.
        - ``RemoveBlocks(keys, tier)``: a holder that exists, has not expired and has
          ``copies[tier] > 0`` loses one copy there, except that a saturated count
          (``MAX_COPIES``) stays; a holder left with no copies on any tier is deleted
          (``removed``). The stamp and store order do not change. An expired holder is
          left for the sweep; an unknown pod or key is ignored.
        - ``ClearPod()``: every holder of (model, pod), expired ones included, is deleted
          (``cleared``).

        Then, while more than ``max_entries`` holders exist (expired ones included), the
        coldest holder of the whole index (every model and pod) is deleted
        (``capacity``, an expired one too). ``apply`` deletes nothing else: expired
        holders it does not store onto wait for ``sweep``.
        """
        ...

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        """Matches of a key chain for every pod holding any of its blocks (or only ``pods``).

        All implementations must see only holders that have not expired, and answer one
        ``PodMatch`` per pod holding at least one position of ``keys`` (restricted to
        ``pods`` when given; pods listed there but holding nothing are left out):
        ``match_length``, the leading positions held on any tier; ``block_count``, the
        positions held (a key listed twice counts twice); ``prefix_tiers``, over the first
        ``match_length`` positions, the set of tiers with copies -> positions. The list's
        order is unspecified. Empty ``keys``, or an unknown model, answer ``[]``. Lookups
        change nothing.
        """
        ...

    async def drop_pod(self, pod_id: str) -> None:
        """Forget a pod entirely: ``ClearPod`` for every model and every rank of ``pod_id``.

        All implementations must count the holders deleted as ``cleared`` and leave nothing
        of the pod in ``stats``.
        """
        ...

    async def sweep(self, budget: int | None = None) -> int:
        """Delete expired holders (``ttl``), coldest first; returns how many it deleted.

        All implementations must delete the expired holders in the coldest-first order, at
        most ``budget`` of them (``None``: all; 0: none). Expired holders are a prefix of
        that order, so the holders visited are the holders deleted, and a return below
        ``budget`` means none is left: callers loop until then. Deferred internal clean-up
        may also run here, but must not change what the other methods answer.
        """
        ...

    async def stats(self) -> IndexStats:
        """Current sizes and cumulative evictions by reason.

        All implementations must count every holder not yet deleted, expired ones
        included: ``entries``; ``entries_by_pod``, for each (model, pod) with at least one
        holder; ``keys_by_model``, distinct keys with a holder, for each model with one;
        ``evictions``, every reason in ``EVICTION_REASONS`` (zero included).
        """
        ...
