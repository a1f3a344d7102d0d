"""MemoryIndex: what a caller of the index protocol sees."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.events.model import Tier
from service.index.memory import TTL_GENERATIONS, MemoryIndex
from service.index.protocol import (
    ClearPod,
    IndexOp,
    PodMatch,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
)

A = PodRank("10.0.0.1:8000")
B = PodRank("10.0.0.2:8000")
A1 = PodRank("10.0.0.1:8000", 1)
GPU, CPU, DISK = (1 << Tier.GPU), (1 << Tier.CPU), (1 << Tier.DISK)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def apply(index: MemoryIndex, pod: PodRank, *ops: IndexOp, model: str = "m") -> None:
    asyncio.run(index.apply(model, pod, ops))


def lookup(
    index: MemoryIndex,
    keys: Sequence[int],
    pods: Sequence[PodRank] | None = None,
    model: str = "m",
) -> dict[PodRank, PodMatch]:
    return {m.pod: m for m in asyncio.run(index.lookup(model, keys, pods))}


def test_longest_prefix_block_count_and_tiers() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2, 3, 4]))
    apply(index, B, StoreBlocks([1, 2]), StoreBlocks([4], Tier.CPU))
    apply(index, A, StoreBlocks([2], Tier.CPU))

    found = lookup(index, [1, 2, 3, 4, 5])

    assert (found[A].match_length, found[A].block_count) == (4, 4)
    assert found[A].prefix_tiers == {GPU: 3, GPU | CPU: 1}
    assert (found[B].match_length, found[B].block_count) == (2, 3)
    assert found[B].prefix_tiers == {GPU: 2}


def test_pod_holding_only_later_blocks_has_zero_match() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([2, 3]))
    found = lookup(index, [1, 2, 3])
    assert found[A].match_length == 0
    assert found[A].block_count == 2
    assert found[A].prefix_tiers == {}


def test_models_are_separate_shards() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2]), model="llama")
    assert lookup(index, [1, 2], model="qwen") == {}
    assert lookup(index, [1, 2], model="llama")[A].match_length == 2


def test_data_parallel_ranks_are_separate_pods() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, A1, StoreBlocks([1]))
    found = lookup(index, [1, 2])
    assert found[A].match_length == 2
    assert found[A1].match_length == 1


def test_remove_one_tier_keeps_the_other() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2]), StoreBlocks([1, 2], Tier.CPU))
    apply(index, A, RemoveBlocks([1, 2], Tier.GPU))
    found = lookup(index, [1, 2])
    assert found[A].prefix_tiers == {CPU: 2}
    apply(index, A, RemoveBlocks([1], Tier.CPU))
    assert lookup(index, [1, 2])[A].match_length == 0
    stats = asyncio.run(index.stats())
    assert stats.entries == 1
    assert stats.evictions["removed"] == 1


def test_removing_unknown_blocks_or_pods_is_harmless() -> None:
    index = MemoryIndex()
    apply(index, A, RemoveBlocks([7]))
    apply(index, A, StoreBlocks([1]))
    apply(index, B, RemoveBlocks([1]))
    apply(index, A, RemoveBlocks([1], Tier.DISK))
    assert lookup(index, [1])[A].match_length == 1
    assert asyncio.run(index.stats()).entries == 1


def test_clear_pod_forgets_only_that_pod_and_it_can_store_again() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2, 3]))
    apply(index, B, StoreBlocks([1, 2]))
    apply(index, A, ClearPod())
    assert set(lookup(index, [1, 2, 3])) == {B}
    apply(index, A, StoreBlocks([1]))
    assert lookup(index, [1, 2, 3])[A].match_length == 1
    asyncio.run(index.sweep())
    stats = asyncio.run(index.stats())
    assert stats.entries == 3
    assert stats.evictions["cleared"] == 3
    assert stats.keys_by_model["m"] == 2


def test_drop_pod_removes_every_rank_in_every_model() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1]), model="x")
    apply(index, A1, StoreBlocks([1]), model="x")
    apply(index, A, StoreBlocks([1]), model="y")
    apply(index, B, StoreBlocks([1]), model="y")
    asyncio.run(index.drop_pod(A.pod_id))
    assert lookup(index, [1], model="x") == {}
    assert set(lookup(index, [1], model="y")) == {B}


def test_candidate_filter_restricts_answer() -> None:
    index = MemoryIndex()
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, B, StoreBlocks([1]))
    assert set(lookup(index, [1, 2], pods=[B])) == {B}
    assert lookup(index, [1, 2], pods=[PodRank("unknown")]) == {}


def test_entries_expire_after_ttl_unless_restored() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=80.0, clock=clock)
    apply(index, A, StoreBlocks([1, 2]))
    apply(index, B, StoreBlocks([1]))
    clock.now += 70
    apply(index, A, StoreBlocks([1], Tier.CPU))  # a store on any tier refreshes the entry
    clock.now += 20  # A's block 2 and B's block 1 are now 90 s old, past the 80 s TTL
    asyncio.run(index.sweep())
    found = lookup(index, [1, 2])
    assert set(found) == {A}
    assert found[A].match_length == 1
    assert asyncio.run(index.stats()).evictions["ttl"] == 2


def test_entries_live_at_least_ttl() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=80.0, clock=clock)
    apply(index, A, StoreBlocks([1]))
    clock.now += 79.9
    asyncio.run(index.sweep())
    assert lookup(index, [1])[A].match_length == 1
    clock.now += 80.0 / TTL_GENERATIONS + 0.2
    asyncio.run(index.sweep())
    assert lookup(index, [1]) == {}


def test_sweep_budget_spreads_expiry_over_calls() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=8.0, clock=clock)
    apply(index, A, StoreBlocks(range(1, 1001)))
    clock.now += 100
    assert asyncio.run(index.sweep(budget=300)) == 300
    assert asyncio.run(index.stats()).entries == 700
    while asyncio.run(index.sweep(budget=300)):
        pass
    assert asyncio.run(index.stats()).entries == 0


def test_capacity_evicts_coldest_first() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=800.0, max_entries=4, clock=clock)
    apply(index, A, StoreBlocks([1, 2]))
    clock.now += 200
    apply(index, B, StoreBlocks([1, 2]))
    clock.now += 200
    apply(index, A, StoreBlocks([3, 4]), model="other")
    stats = asyncio.run(index.stats())
    assert stats.entries == 4
    assert stats.evictions["capacity"] == 2
    assert set(lookup(index, [1, 2])) == {B}
    assert lookup(index, [3, 4], model="other")[A].match_length == 2


def test_restored_entry_is_not_evicted_by_its_old_generation() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=800.0, max_entries=2, clock=clock)
    apply(index, A, StoreBlocks([1, 2]))
    clock.now += 200
    apply(index, A, StoreBlocks([1]))
    apply(index, A, StoreBlocks([3]))
    assert lookup(index, [1, 3])[A].match_length == 2
    assert lookup(index, [1, 2, 3])[A].block_count == 2
    assert lookup(index, [2]) == {}


def test_clock_jump_far_past_ttl_expires_before_storing() -> None:
    clock = Clock()
    index = MemoryIndex(ttl=8.0, clock=clock)
    apply(index, A, StoreBlocks([1]))
    clock.now += 16 * 8  # 16 TTLs: generation numbers wrap modulo 16 in the packed fields
    apply(index, A, StoreBlocks([2]))
    assert lookup(index, [1, 2])[A].block_count == 1
    assert asyncio.run(index.stats()).entries == 1


def test_many_pods_share_blocks() -> None:
    index = MemoryIndex()
    pods = [PodRank(f"10.0.1.{i}:8000") for i in range(40)]
    for i, pod in enumerate(pods):
        apply(index, pod, StoreBlocks(range(1, i + 2)))
    found = lookup(index, range(1, 50))
    assert {p: m.match_length for p, m in found.items()} == {
        pod: i + 1 for i, pod in enumerate(pods)
    }


def test_long_chains_count_past_field_width() -> None:
    index = MemoryIndex()
    keys = list(range(1, 2001))
    apply(index, A, StoreBlocks(keys))
    apply(index, B, StoreBlocks(keys[1000:]))
    found = lookup(index, keys)
    assert (found[A].match_length, found[A].block_count) == (2000, 2000)
    assert (found[B].match_length, found[B].block_count) == (0, 1000)


@pytest.mark.parametrize(("ttl", "size"), [(0.0, 10), (10.0, 0)])
def test_rejects_bad_settings(ttl: float, size: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MemoryIndex(ttl=ttl, max_entries=size)
