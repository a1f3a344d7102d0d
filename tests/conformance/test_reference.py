"""ReferenceIndex against cases a reader can check by hand.

The harness holds every backend to ReferenceIndex; these tests hold ReferenceIndex to the
protocol's docstrings. The clock starts at 100.0 s, i.e. tick 1600; most tests use a
1 s TTL, i.e. 16 ticks.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from service.events.model import Tier
from service.index.protocol import (
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
from service.index.reference import ReferenceIndex

A = PodRank("pod-a")
A1 = PodRank("pod-a", 1)
B = PodRank("pod-b")
C = PodRank("pod-c")
GPU, CPU, DISK = (1 << Tier.GPU), (1 << Tier.CPU), (1 << Tier.DISK)
TICK = 1 / 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(ttl: float = 1.0, max_entries: int = 1000) -> tuple[ReferenceIndex, Clock]:
    clock = Clock()
    return ReferenceIndex(ttl=ttl, max_entries=max_entries, clock=clock), clock


def apply(index: ReferenceIndex, pod: PodRank, *ops: IndexOp, model: str = "m") -> None:
    asyncio.run(index.apply(model, pod, ops))


def lookup(
    index: ReferenceIndex,
    keys: Sequence[int],
    pods: Sequence[PodRank] | None = None,
    model: str = "m",
) -> dict[PodRank, tuple[int, int, dict[int, int]]]:
    """pod -> (match_length, block_count, prefix_tiers)."""
    matches: list[PodMatch] = asyncio.run(index.lookup(model, keys, pods))
    return {m.pod: (m.match_length, m.block_count, dict(m.prefix_tiers)) for m in matches}


def stats(index: ReferenceIndex) -> IndexStats:
    return asyncio.run(index.stats())


def sweep(index: ReferenceIndex, budget: int | None = None) -> int:
    return asyncio.run(index.sweep(budget))


# -- copies ---------------------------------------------------------------------------------


def test_a_block_stored_twice_needs_two_removals() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, A, StoreBlocks([1, 2]))  # a second request prefilled the same prefix
    apply(index, A, RemoveBlocks([2]))
    assert lookup(index, [1, 2]) == {A: (2, 2, {GPU: 2})}  # block 2 still held: one copy
    assert stats(index).evictions["removed"] == 0

    apply(index, A, RemoveBlocks([2]))
    assert lookup(index, [1, 2]) == {A: (1, 1, {GPU: 1})}
    assert stats(index).entries == 1
    assert stats(index).evictions["removed"] == 1


def test_a_key_listed_twice_in_one_store_is_two_copies() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1, 1]))
    apply(index, A, RemoveBlocks([1]))
    assert lookup(index, [1]) == {A: (1, 1, {GPU: 1})}
    apply(index, A, RemoveBlocks([1]))
    assert lookup(index, [1]) == {}


def test_copies_count_per_tier() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1], Tier.GPU), StoreBlocks([1, 1], Tier.CPU))
    assert lookup(index, [1]) == {A: (1, 1, {GPU | CPU: 1})}
    apply(index, A, RemoveBlocks([1], Tier.GPU))
    assert lookup(index, [1]) == {A: (1, 1, {CPU: 1})}
    apply(index, A, RemoveBlocks([1], Tier.GPU), RemoveBlocks([1], Tier.DISK))  # no copies
    apply(index, A, RemoveBlocks([1], Tier.CPU))
    assert lookup(index, [1]) == {A: (1, 1, {CPU: 1})}  # one CPU copy left
    apply(index, A, RemoveBlocks([1], Tier.CPU))
    assert lookup(index, [1]) == {}
    assert stats(index).evictions["removed"] == 1  # one holder, deleted once


def test_copies_below_255_all_count() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1] * 254))
    apply(index, A, RemoveBlocks([1] * 253))
    assert lookup(index, [1]) == {A: (1, 1, {GPU: 1})}
    apply(index, A, RemoveBlocks([1]))
    assert lookup(index, [1]) == {}


def test_copies_saturate_at_255_and_then_never_go_down() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1] * 300), StoreBlocks([1], Tier.CPU))
    apply(index, A, RemoveBlocks([1] * 1000), RemoveBlocks([1], Tier.CPU))
    assert lookup(index, [1]) == {A: (1, 1, {GPU: 1})}  # only the TTL, a clear or capacity
    apply(index, A, ClearPod())
    assert stats(index).evictions == {"removed": 0, "cleared": 1, "ttl": 0, "capacity": 0}


def test_removals_of_unknown_pods_or_keys_do_nothing() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1]))
    apply(index, B, RemoveBlocks([1]))
    apply(index, A, RemoveBlocks([2]))
    assert lookup(index, [1]) == {A: (1, 1, {GPU: 1})}
    assert stats(index).entries_by_pod == {("m", A): 1}


# -- ticks and TTL ----------------------------------------------------------------------------


def test_ticks_are_sixteenths_and_ttls_round_up() -> None:
    assert tick_of(100.0) == 1600
    assert tick_of(100.0624) == 1600
    assert tick_of(100.0625) == 1601
    assert tick_of(-0.01) == -1
    assert ttl_ticks(1.0) == 16
    assert ttl_ticks(0.3) == 5  # 4.8 ticks, rounded up
    assert ttl_ticks(0.001) == 1  # never zero


def test_a_holder_expires_ttl_ticks_after_its_store() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1]))  # tick 1600
    clock.now = 100.0 + 16 * TICK - 0.001  # tick 1615: 15 ticks old
    assert lookup(index, [1]) == {A: (1, 1, {GPU: 1})}
    clock.now = 101.0  # tick 1616: 16 ticks old
    assert lookup(index, [1]) == {}


def test_the_stamp_is_the_tick_not_the_second() -> None:
    index, clock = make(ttl=1.0)
    clock.now = 100.99  # tick 1615
    apply(index, A, StoreBlocks([1]))
    clock.now = 101.93  # tick 1630
    assert set(lookup(index, [1])) == {A}
    clock.now = 101.9375  # tick 1631, only 0.9475 s later: a holder lives (ttl - 1/16, ttl]
    assert lookup(index, [1]) == {}


def test_a_fractional_ttl_rounds_up_to_whole_ticks() -> None:
    index, clock = make(ttl=0.3)  # 5 ticks
    apply(index, A, StoreBlocks([1]))
    clock.now += 4 * TICK
    assert set(lookup(index, [1])) == {A}
    clock.now += TICK
    assert lookup(index, [1]) == {}


def test_an_expired_holder_is_hidden_but_counted_until_swept() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1, 2]))
    clock.now += 1.0
    assert lookup(index, [1, 2]) == {}
    assert stats(index).entries == 2
    assert stats(index).entries_by_pod == {("m", A): 2}
    assert sweep(index) == 2
    assert stats(index).entries == 0
    assert stats(index).evictions["ttl"] == 2


def test_a_store_on_any_tier_refreshes_the_holder() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1], Tier.GPU))
    clock.now += 10 * TICK
    apply(index, A, StoreBlocks([1], Tier.CPU))
    clock.now += 10 * TICK  # 20 ticks after the GPU store, 10 after the CPU one
    assert lookup(index, [1]) == {A: (1, 1, {GPU | CPU: 1})}


def test_a_removal_does_not_refresh_the_holder() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1, 1]))
    clock.now += 10 * TICK
    apply(index, A, RemoveBlocks([1]))
    clock.now += 6 * TICK
    assert lookup(index, [1]) == {}


def test_an_expired_holder_ignores_removals_and_is_left_for_the_sweep() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1]))
    clock.now += 1.0
    apply(index, A, RemoveBlocks([1]))
    assert stats(index).entries == 1
    assert sweep(index) == 1
    assert stats(index).evictions == {"removed": 0, "cleared": 0, "ttl": 1, "capacity": 0}


def test_a_store_after_expiry_counts_a_ttl_eviction_and_starts_at_one_copy() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1] * 3))
    clock.now += 1.0
    apply(index, A, StoreBlocks([1]))
    assert stats(index).evictions["ttl"] == 1
    assert stats(index).entries == 1
    apply(index, A, RemoveBlocks([1]))  # the three old copies went with the old holder
    assert lookup(index, [1]) == {}
    assert stats(index).evictions["removed"] == 1


# -- capacity --------------------------------------------------------------------------------


def test_capacity_evicts_the_oldest_stamp_first() -> None:
    index, clock = make(max_entries=3)
    apply(index, B, StoreBlocks([1]))
    clock.now += TICK
    apply(index, A, StoreBlocks([2]))
    clock.now += TICK
    apply(index, A, StoreBlocks([3]))
    apply(index, A, StoreBlocks([4]))
    assert lookup(index, [1]) == {}  # pod-b's block: the coldest, despite "pod-a" < "pod-b"
    assert lookup(index, [2, 3, 4]) == {A: (3, 3, {GPU: 3})}
    assert stats(index).evictions["capacity"] == 1


def test_capacity_ties_break_by_model_pod_rank_then_store_order() -> None:
    index, clock = make(max_entries=5)
    # Five holders stored in one tick.
    apply(index, A, StoreBlocks([1]), model="n")
    apply(index, B, StoreBlocks([1]), model="m")
    apply(index, A1, StoreBlocks([1]), model="m")
    apply(index, A, StoreBlocks([3, 2, 3]), model="m")  # store order: 2, then 3
    clock.now += TICK

    def held() -> set[tuple[str, PodRank, int]]:
        return {
            (model, pod, key)
            for model in ("m", "n")
            for key in (1, 2, 3)
            for pod in lookup(index, [key], model=model)
        }

    evicted = []
    for key in range(10, 15):  # each newer holder pushes the coldest out
        before = held()
        apply(index, C, StoreBlocks([key]), model="z")
        evicted += sorted(before - held())
    assert evicted == [("m", A, 2), ("m", A, 3), ("m", A1, 1), ("m", B, 1), ("n", A, 1)]
    assert stats(index).evictions["capacity"] == 5


def test_capacity_runs_after_the_whole_batch() -> None:
    index, _ = make(max_entries=2)
    apply(index, A, StoreBlocks([1, 2, 3]), RemoveBlocks([3]))
    assert lookup(index, [1, 2]) == {A: (2, 2, {GPU: 2})}
    assert stats(index).evictions["capacity"] == 0


def test_capacity_counts_expired_holders_and_evicts_them_first_as_capacity() -> None:
    index, clock = make(ttl=1.0, max_entries=2)
    apply(index, A, StoreBlocks([1, 2]))
    clock.now += 1.0
    apply(index, B, StoreBlocks([5]))
    assert stats(index).entries_by_pod == {("m", A): 1, ("m", B): 1}
    assert stats(index).evictions == {"removed": 0, "cleared": 0, "ttl": 0, "capacity": 1}


def test_a_restored_holder_moves_to_the_hot_end() -> None:
    index, _ = make(max_entries=2)
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, A, StoreBlocks([1]))  # same tick: order is now 2, 1
    apply(index, A, StoreBlocks([3]))
    assert lookup(index, [1, 2, 3]) == {A: (1, 2, {GPU: 1})}


# -- clear, drop, sweep ------------------------------------------------------------------------


def test_clear_pod_deletes_that_pods_holders_expired_ones_included() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1, 2]))
    clock.now += 1.0
    apply(index, A, StoreBlocks([3]))
    apply(index, B, StoreBlocks([1]))
    apply(index, A, ClearPod())
    assert lookup(index, [1, 2, 3]) == {B: (1, 1, {GPU: 1})}
    assert stats(index).entries_by_pod == {("m", B): 1}
    assert stats(index).evictions == {"removed": 0, "cleared": 3, "ttl": 0, "capacity": 0}
    apply(index, A, ClearPod(), StoreBlocks([2]))  # the engine restarted and stored again
    assert lookup(index, [2]) == {A: (1, 1, {GPU: 1})}


def test_drop_pod_clears_every_rank_in_every_model() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1]), model="x")
    apply(index, A1, StoreBlocks([1, 2]), model="x")
    apply(index, A, StoreBlocks([1]), model="y")
    apply(index, PodRank("pod-ab"), StoreBlocks([1]), model="y")
    asyncio.run(index.drop_pod("pod-a"))
    assert lookup(index, [1], model="x") == {}
    assert set(lookup(index, [1], model="y")) == {PodRank("pod-ab")}
    assert stats(index).entries_by_pod == {("y", PodRank("pod-ab")): 1}
    assert stats(index).keys_by_model == {"y": 1}
    assert stats(index).evictions["cleared"] == 4


def test_sweep_deletes_expired_holders_coldest_first_within_its_budget() -> None:
    index, clock = make(ttl=1.0)
    apply(index, A, StoreBlocks([1]))  # tick 1600
    clock.now += TICK
    apply(index, B, StoreBlocks([2]))  # tick 1601
    clock.now += TICK
    apply(index, A, StoreBlocks([3]))  # tick 1602
    clock.now = 100.0 + 17 * TICK  # tick 1617: the first two have expired
    assert sweep(index, budget=0) == 0
    assert sweep(index, budget=1) == 1
    assert stats(index).entries_by_pod == {("m", A): 1, ("m", B): 1}  # pod-a's block 1 went
    assert sweep(index, budget=5) == 1  # fewer than the budget: nothing expired is left
    assert sweep(index) == 0
    assert stats(index).entries_by_pod == {("m", A): 1}
    assert stats(index).evictions["ttl"] == 2


# -- lookups and stats --------------------------------------------------------------------------


def test_lookup_match_length_block_count_and_tiers() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1, 2, 3]), StoreBlocks([2], Tier.CPU), StoreBlocks([3], Tier.DISK))
    apply(index, B, StoreBlocks([2, 3]))
    assert lookup(index, [1, 2, 3, 4]) == {
        A: (3, 3, {GPU: 1, GPU | CPU: 1, GPU | DISK: 1}),
        B: (0, 2, {}),
    }


def test_lookup_counts_a_repeated_key_at_each_position() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1]))
    assert lookup(index, [1, 1, 2, 1]) == {A: (2, 3, {GPU: 2})}


def test_lookup_pods_filter_models_and_empty_chains() -> None:
    index, _ = make()
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, B, StoreBlocks([1]))
    assert lookup(index, [1, 2], pods=[B, PodRank("pod-unknown")]) == {B: (1, 1, {GPU: 1})}
    assert lookup(index, [1, 2], pods=[]) == {}
    assert lookup(index, [1, 2], model="other") == {}
    assert lookup(index, []) == {}


def test_stats_count_holders_keys_and_every_eviction_reason() -> None:
    index, _ = make()
    assert stats(index) == IndexStats(
        0, {}, {}, {"removed": 0, "cleared": 0, "ttl": 0, "capacity": 0}
    )
    apply(index, A, StoreBlocks([1, 2, 2]))
    apply(index, B, StoreBlocks([2, 3]))
    apply(index, A, StoreBlocks([9]), model="other")
    found = stats(index)
    assert found.entries == 5
    assert found.entries_by_pod == {("m", A): 2, ("m", B): 2, ("other", A): 1}
    assert found.keys_by_model == {"m": 3, "other": 1}


@pytest.mark.parametrize(
    ("ttl", "size"), [(0.0, 10), (-1.0, 10), (math.inf, 10), (math.nan, 10), (1.0, 0)]
)
def test_rejects_bad_settings(ttl: float, size: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ReferenceIndex(ttl=ttl, max_entries=size)
