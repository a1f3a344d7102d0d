"""Random event streams: MemoryIndex answers exactly as a tiny reference model does."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from service.events.model import Tier
from service.index import memory
from service.index.memory import TTL_GENERATIONS, MemoryIndex
from service.index.protocol import ClearPod, PodMatch, PodRank, RemoveBlocks, StoreBlocks

TTL = 80.0
GENERATION = TTL / TTL_GENERATIONS
MODELS = ("m1", "m2")
PODS = (PodRank("a"), PodRank("b"), PodRank("a", 1), PodRank("c"))
KEYS = st.integers(min_value=1, max_value=12)
CHAINS = st.lists(KEYS, min_size=1, max_size=14)
TIERS = st.sampled_from(list(Tier))


@dataclass
class Entry:
    tiers: set[Tier] = field(default_factory=set)
    generation: int = 0


@dataclass
class Reference:
    """The index's documented behaviour, written the obvious way."""

    entries: dict[tuple[str, PodRank, int], Entry] = field(default_factory=dict)

    def store(self, model: str, pod: PodRank, keys: list[int], tier: Tier, gen: int) -> None:
        for key in keys:
            entry = self.entries.setdefault((model, pod, key), Entry())
            entry.tiers.add(tier)
            entry.generation = gen

    def remove(self, model: str, pod: PodRank, keys: list[int], tier: Tier) -> None:
        for key in keys:
            entry = self.entries.get((model, pod, key))
            if entry is not None:
                entry.tiers.discard(tier)
                if not entry.tiers:
                    del self.entries[(model, pod, key)]

    def clear(self, model: str, pod: PodRank) -> None:
        for k in [k for k in self.entries if k[:2] == (model, pod)]:
            del self.entries[k]

    def expire(self, now_gen: int) -> None:
        for k in [k for k, e in self.entries.items() if e.generation < now_gen - TTL_GENERATIONS]:
            del self.entries[k]

    def lookup(
        self, model: str, chain: list[int]
    ) -> dict[PodRank, tuple[int, int, dict[int, int]]]:
        answer = {}
        for pod in PODS:
            held = [self.entries.get((model, pod, key)) for key in chain]
            if not any(held):
                continue
            match_length = next((i for i, e in enumerate(held) if e is None), len(chain))
            tier_sets: Counter[int] = Counter()
            for e in held[:match_length]:
                assert e is not None
                tier_sets[sum(1 << t for t in e.tiers)] += 1
            answer[pod] = (match_length, sum(e is not None for e in held), dict(tier_sets))
        return answer


def as_tuples(matches: list[PodMatch]) -> dict[PodRank, tuple[int, int, dict[int, int]]]:
    return {m.pod: (m.match_length, m.block_count, dict(m.prefix_tiers)) for m in matches}


class IndexMatchesReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 10_000.0
        self.index = MemoryIndex(ttl=TTL, clock=lambda: self.now)
        self.reference = Reference()

    def generation(self) -> int:
        return int(self.now // GENERATION)

    @rule(model=st.sampled_from(MODELS), pod=st.sampled_from(PODS), keys=CHAINS, tier=TIERS)
    def store(self, model: str, pod: PodRank, keys: list[int], tier: Tier) -> None:
        asyncio.run(self.index.apply(model, pod, [StoreBlocks(keys, tier)]))
        self.reference.store(model, pod, keys, tier, self.generation())

    @rule(model=st.sampled_from(MODELS), pod=st.sampled_from(PODS), keys=CHAINS, tier=TIERS)
    def remove(self, model: str, pod: PodRank, keys: list[int], tier: Tier) -> None:
        asyncio.run(self.index.apply(model, pod, [RemoveBlocks(keys, tier)]))
        self.reference.remove(model, pod, keys, tier)

    @rule(model=st.sampled_from(MODELS), pod=st.sampled_from(PODS), keys=CHAINS)
    def clear_then_store(self, model: str, pod: PodRank, keys: list[int]) -> None:
        asyncio.run(self.index.apply(model, pod, [ClearPod(), StoreBlocks(keys)]))
        self.reference.clear(model, pod)
        self.reference.store(model, pod, keys, Tier.GPU, self.generation())

    @rule(pod_id=st.sampled_from(["a", "b", "c"]))
    def drop_pod(self, pod_id: str) -> None:
        asyncio.run(self.index.drop_pod(pod_id))
        for model in MODELS:
            for pod in PODS:
                if pod.pod_id == pod_id:
                    self.reference.clear(model, pod)

    @rule(seconds=st.floats(min_value=0, max_value=TTL * 1.5), budget=st.sampled_from([3, None]))
    def advance_clock(self, seconds: float, budget: int | None) -> None:
        self.now += seconds
        # A budgeted sweep may leave work; the final unbounded one must finish it.
        asyncio.run(self.index.sweep(budget))
        asyncio.run(self.index.sweep())
        self.reference.expire(self.generation())

    @rule(model=st.sampled_from(MODELS), chain=CHAINS)
    def lookup_matches(self, model: str, chain: list[int]) -> None:
        found = as_tuples(asyncio.run(self.index.lookup(model, chain)))
        assert found == self.reference.lookup(model, chain)

    @invariant()
    def sizes_match(self) -> None:
        stats = asyncio.run(self.index.stats())
        assert stats.entries == len(self.reference.entries)
        by_pod = Counter(k[:2] for k in self.reference.entries)
        assert {k: v for k, v in stats.entries_by_pod.items() if v} == dict(by_pod)


IndexMatchesReference.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_index_matches_reference = IndexMatchesReference.TestCase


class CapacityEvictsColdest(RuleBasedStateMachine):
    """With a small bound, only the coldest entries go, and the bound always holds."""

    MAX = 10

    def __init__(self) -> None:
        super().__init__()
        self.now = 10_000.0
        self.index = MemoryIndex(ttl=TTL, max_entries=self.MAX, clock=lambda: self.now)
        self.reference = Reference()

    @rule(pod=st.sampled_from(PODS), keys=CHAINS, seconds=st.floats(0, GENERATION * 2))
    def store_later(self, pod: PodRank, keys: list[int], seconds: float) -> None:
        self.now += seconds
        asyncio.run(self.index.apply("m", pod, [StoreBlocks(keys)]))
        self.reference.store("m", pod, keys, Tier.GPU, int(self.now // GENERATION))
        self.check_evictions()

    def check_evictions(self) -> None:
        real = {
            ("m", m.pod, key)
            for key in range(1, 13)
            for m in asyncio.run(self.index.lookup("m", [key]))
            if m.match_length
        }
        assert real <= set(self.reference.entries)
        assert len(real) <= self.MAX
        evicted = set(self.reference.entries) - real
        if evicted and real:
            newest_evicted = max(self.reference.entries[k].generation for k in evicted)
            oldest_kept = min(self.reference.entries[k].generation for k in real)
            assert newest_evicted <= oldest_kept
        for k in evicted:
            del self.reference.entries[k]
        assert asyncio.run(self.index.stats()).entries == len(real)


CapacityEvictsColdest.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
test_capacity_evicts_coldest = CapacityEvictsColdest.TestCase


class _SmallLogs:
    """Mixin: a generation's log holds at most 3 keys per slot (it is 65,536 in service),
    so the streams above also cover generations cut into several logs."""

    def __init__(self) -> None:
        self._chunk = memory._LOG_CHUNK
        memory._LOG_CHUNK = 3
        super().__init__()

    def teardown(self) -> None:
        memory._LOG_CHUNK = self._chunk


class IndexMatchesReferenceSmallLogs(_SmallLogs, IndexMatchesReference):
    pass


class CapacityEvictsColdestSmallLogs(_SmallLogs, CapacityEvictsColdest):
    pass


IndexMatchesReferenceSmallLogs.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
CapacityEvictsColdestSmallLogs.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_index_matches_reference_small_logs = IndexMatchesReferenceSmallLogs.TestCase
test_capacity_evicts_coldest_small_logs = CapacityEvictsColdestSmallLogs.TestCase
