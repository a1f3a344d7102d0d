"""The harness itself: it fails on broken backends, and passes on a correct one.

A differential harness that cannot fail proves nothing. Each broken backend below gets one
rule of the protocol wrong; both modes (hypothesis and the seeded soak) must catch every
one, and shrink it to a handful of steps. ReferenceIndex against a second instance of
itself must pass both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import Phase, settings

from service.events.model import Tier
from service.index.protocol import (
    MAX_COPIES,
    ClearPod,
    IndexOp,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
    tick_of,
)
from service.index.reference import ReferenceIndex, _Holder, _Where
from tests.conformance.harness import (
    Advance,
    Apply,
    BackendFactory,
    Clock,
    Config,
    Divergence,
    DropPod,
    Stream,
    Sweep,
    constructor,
    differential_test,
    hypothesis_settings,
    random_stream,
    soak,
    soak_test,
)


class DropsRemovals(ReferenceIndex):
    """Ignores every BlockRemoved."""

    async def apply(self, model: str, pod: PodRank, ops: Sequence[IndexOp]) -> None:
        await super().apply(model, pod, [op for op in ops if not isinstance(op, RemoveBlocks)])


class IgnoresCopies(ReferenceIndex):
    """Treats a removal as deleting the holder, however many copies it has."""

    def _remove(self, model: str, pod: PodRank, key: int, tier: Tier, now: int) -> None:
        holder = self._holder(model, pod, key)
        if holder is not None and not self._is_expired(holder, now) and holder.copies[tier]:
            self._delete((model, pod, key), "removed")


class NeverExpires(ReferenceIndex):
    """Keeps every holder whatever its age."""

    def _is_expired(self, holder: _Holder, now: int) -> bool:
        return False


class RaisesOnClear(ReferenceIndex):
    """Fails outright on a clear."""

    def _clear(self, model: str, pod: PodRank) -> None:
        raise RuntimeError("clear is not implemented")


class EvictsHottest(ReferenceIndex):
    """Over capacity, evicts the most recently stored holder instead of the coldest."""

    def _evict_to_capacity(self) -> None:
        while self._entries() > self._max_entries:
            _, hottest = max(self._coldest_first())
            self._delete(hottest, "capacity")


BROKEN = [DropsRemovals, IgnoresCopies, NeverExpires, EvictsHottest]

# Fixed examples, so whether the harness catches a broken backend does not vary by run.
CATCH = settings(
    hypothesis_settings(Config()),
    max_examples=300,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    print_blob=False,
)


@pytest.mark.parametrize("broken", BROKEN, ids=lambda cls: cls.__name__)
def test_hypothesis_catches(broken: type[ReferenceIndex]) -> None:
    # Without shrinking: hypothesis' shrinker spends 5-25 s on each of these.
    catch = settings(CATCH, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(Divergence):
        differential_test(constructor(broken), Config(), catch)()


def test_hypothesis_shrinks_a_dropped_removal_to_one_step() -> None:
    with pytest.raises(Divergence) as caught:
        differential_test(constructor(DropsRemovals), Config(), CATCH)()
    # What hypothesis raises comes from the shrunk stream: one apply, a store then a removal.
    assert caught.value.step == 0, str(caught.value)
    assert "after step 0 Apply(" in str(caught.value)
    assert "RemoveBlocks(" in str(caught.value)


@pytest.mark.parametrize("broken", BROKEN, ids=lambda cls: cls.__name__)
def test_the_soak_catches_and_shrinks(broken: type[ReferenceIndex]) -> None:
    config = Config(steps=300, shrink_seconds=5)
    with pytest.raises(Divergence, match="soak seed 1") as caught:
        soak(constructor(broken), config, seed=1)
    shrunk = str(caught.value).split("\nshrunk to ", 1)[1]
    assert int(shrunk.split(" ", 1)[0]) <= 4, str(caught.value)


def test_a_backend_raising_is_a_divergence_with_its_step() -> None:
    with pytest.raises(Divergence, match="a call raised") as caught:
        soak(constructor(RaisesOnClear), Config(steps=300, shrink_seconds=5), seed=1)
    assert "RuntimeError('clear is not implemented')" in str(caught.value)
    assert "ClearPod()" in str(caught.value).split("\nshrunk to ", 1)[1]


def test_a_failing_streams_repr_is_python_that_rebuilds_it() -> None:
    stream = random_stream(Config(steps=200), seed=4)
    steps = (Stream, Apply, Advance, Sweep, DropPod)
    names = {
        cls.__name__: cls for cls in (*steps, PodRank, Tier, StoreBlocks, RemoveBlocks, ClearPod)
    }
    assert repr(eval(repr(stream), names)) == repr(stream)


def test_knobs_come_from_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    config = Config.from_env(
        {
            "KV_CONFORMANCE_SEED": "7",
            "KV_CONFORMANCE_STEPS": "5",
            "KV_CONFORMANCE_KEYS": "3",
            "KV_CONFORMANCE_PODS": "1",
            "KV_CONFORMANCE_TTL": "2",
            "KV_CONFORMANCE_TRACE": "1",
        }
    )
    assert (config.seeds, config.steps, config.ttl, config.trace) == ((7,), 5, 2.0, True)
    assert config.key_values == (1, 2, 0)
    assert config.pod_ranks == (PodRank("pod-a"), PodRank("pod-a", 1))
    assert Config.from_env({}) == Config()
    soak(constructor(ReferenceIndex), config, seed=7)
    traced = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in traced] == ["0", "1", "2", "3", "4"]


test_reference_against_itself = differential_test(constructor(ReferenceIndex))
test_reference_against_itself_soak = soak_test(constructor(ReferenceIndex))


class Spy(ReferenceIndex):
    """ReferenceIndex that tallies which rules a stream exercised."""

    def __init__(self, tally: Counter[str], *, ttl: float, max_entries: int, clock: Clock):
        super().__init__(ttl=ttl, max_entries=max_entries, clock=clock)
        self.tally = tally

    def _store(self, model: str, pod: PodRank, key: int, tier: Tier, now: int) -> None:
        holder = self._holder(model, pod, key)
        if holder is not None and self._is_expired(holder, now):
            self.tally["store after expiry"] += 1
        elif holder is not None and holder.copies[tier] == MAX_COPIES - 1:
            self.tally["copies reach saturation"] += 1
        super()._store(model, pod, key, tier, now)

    def _remove(self, model: str, pod: PodRank, key: int, tier: Tier, now: int) -> None:
        holder = self._holder(model, pod, key)
        if holder is not None and self._is_expired(holder, now):
            self.tally["removal of an expired holder"] += 1
        elif holder is not None and 1 < holder.copies[tier] < MAX_COPIES:
            self.tally["removal leaves copies"] += 1
        elif holder is not None and holder.copies[tier] == MAX_COPIES:
            self.tally["removal of a saturated copy"] += 1
        super()._remove(model, pod, key, tier, now)

    def _clear(self, model: str, pod: PodRank) -> None:
        now = tick_of(self._clock())
        holders = list(self._pods.get((model, pod), {}).values())
        if any(self._is_expired(holder, now) for holder in holders):
            self.tally["clear of an expired holder"] += 1
        if holders:
            self.tally["evicted: cleared"] += 1
        super()._clear(model, pod)

    def _delete(self, where: _Where, reason: str) -> None:
        self.tally[f"evicted: {reason}"] += 1
        super()._delete(where, reason)

    async def sweep(self, budget: int | None = None) -> int:
        deleted = await super().sweep(budget)
        if budget is not None and deleted == budget > 0:
            self.tally["sweep stopped by its budget"] += 1
        return deleted


def spy_factory(tally: Counter[str]) -> BackendFactory:
    def make(*, ttl: float, max_entries: int, clock: Clock) -> Spy:
        return Spy(tally, ttl=ttl, max_entries=max_entries, clock=clock)

    return constructor(make)


def test_the_soak_reaches_every_rule() -> None:
    """The default soak streams collide enough to exercise every rule, several times."""
    tally: Counter[str] = Counter()
    config = Config()
    for seed in config.seeds:
        soak(spy_factory(tally), config, seed)
    assert set(tally) == {
        "store after expiry",
        "copies reach saturation",
        "removal of an expired holder",
        "removal leaves copies",
        "removal of a saturated copy",
        "clear of an expired holder",
        "sweep stopped by its budget",
        "evicted: removed",
        "evicted: cleared",
        "evicted: ttl",
        "evicted: capacity",
    }, tally
    assert min(tally.values()) >= 3, tally
