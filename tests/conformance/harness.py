"""One differential harness for every ``BlockIndex`` backend.

Random event streams run through a backend and through ``ReferenceIndex`` side by side,
under one clock the harness advances. After every step the harness compares ``lookup``
of several chains (all pods, and a ``pods`` filter) and ``stats()``, and the return of
each ``sweep``. The key space is small (8 keys by default, 0 and 2**64 - 1 among them)
and pods few, so stores, duplicate copies, removals, clears, TTL expiry and capacity
eviction all collide. A difference fails with the step, the call and both answers:
hypothesis shrinks the stream to a minimal step list; the seeded soak prints its seed,
shrinks the steps it ran and prints them as Python to paste into a test.

Plugging in a backend is two steps:

1. A factory: called as ``factory(ttl=..., max_entries=..., clock=...)`` (seconds,
   holders, a callable giving seconds), it returns an async context manager whose
   ``__aenter__`` gives a fresh, empty backend and whose ``__aexit__`` tears it down
   (``BackendFactory``). The harness opens one per hypothesis example and per soak seed,
   inside the event loop that runs it. A backend built by exactly that call with nothing
   to tear down (the native table) needs only ``constructor(NativeIndex)``. One with
   set-up and tear-down (Redis) writes an ``asynccontextmanager``::

       @asynccontextmanager
       async def redis_backend(
           *, ttl: float, max_entries: int, clock: Clock
       ) -> AsyncIterator[RedisIndex]:
           client = redis.asyncio.from_url(REDIS_URL)
           prefix = f"conformance:{uuid.uuid4().hex}:"  # fresh and empty per stream
           try:
               yield RedisIndex(client, prefix, ttl=ttl, max_entries=max_entries, clock=clock)
           finally:
               await delete_keys(client, prefix + "*")
               await client.aclose()

2. A test module naming it twice, e.g. ``tests/conformance/test_native.py``::

       test_native = differential_test(constructor(NativeIndex))
       test_native_soak = soak_test(constructor(NativeIndex))

   (mark or skip the module when the backend is unavailable, e.g. no Redis server).

Knobs, as environment variables (read when a test is built):

=================================  =====================================================
``KV_CONFORMANCE_EXAMPLES``        hypothesis streams per differential test (200)
``KV_CONFORMANCE_SEED``            soak seed: an int, or ``random`` (default: 1, 2, 3)
``KV_CONFORMANCE_STEPS``           soak steps per seed (1000)
``KV_CONFORMANCE_MODELS``          models (2)
``KV_CONFORMANCE_PODS``            pod ids (3; the first also runs data-parallel rank 1)
``KV_CONFORMANCE_KEYS``            distinct block keys (8)
``KV_CONFORMANCE_CAPACITY``        ``max_entries`` (12; hypothesis also tries a quarter
                                   of it, and unbounded)
``KV_CONFORMANCE_TTL``             TTL in seconds (0.3, i.e. 5 ticks; hypothesis also
                                   tries 1/64 s, i.e. 1 tick)
``KV_CONFORMANCE_TRACE``           1: print every step as it runs
``KV_CONFORMANCE_SHRINK_SECONDS``  time the soak may spend shrinking a failure (30)
=================================  =====================================================

The harness runs calls one at a time; races between concurrent calls are not covered here.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.vendor.pretty import RepresentationPrinter

from service.events.model import Tier
from service.index.protocol import (
    TICKS_PER_SECOND,
    BlockIndex,
    ClearPod,
    IndexOp,
    IndexStats,
    PodMatch,
    PodRank,
    RemoveBlocks,
    StoreBlocks,
    ttl_ticks,
)
from service.index.reference import ReferenceIndex

__all__ = [
    "UNBOUNDED",
    "UNKNOWN_POD",
    "Advance",
    "Apply",
    "BackendFactory",
    "Clock",
    "Config",
    "Divergence",
    "DropPod",
    "IndexConstructor",
    "Step",
    "Stream",
    "Sweep",
    "check",
    "constructor",
    "differential_test",
    "hypothesis_settings",
    "random_stream",
    "run_stream",
    "soak",
    "soak_test",
    "streams",
]

Clock = Callable[[], float]
T = TypeVar("T")

UNBOUNDED = 1 << 40
"""A ``max_entries`` no stream reaches."""

START = 100.01
"""The harness clock's first reading (not on a tick boundary)."""

UNKNOWN_POD = PodRank("pod-unknown")
"""A pod no stream writes: lookups filtered on it, and drops of it, must find nothing."""


class BackendFactory(Protocol):
    """Opens one fresh, empty backend; leaving the context tears it down."""

    def __call__(
        self, *, ttl: float, max_entries: int, clock: Clock
    ) -> AbstractAsyncContextManager[BlockIndex]: ...


class IndexConstructor(Protocol):
    """A backend class (or function) built from the settings alone."""

    def __call__(self, *, ttl: float, max_entries: int, clock: Clock) -> BlockIndex: ...


def constructor(make: IndexConstructor) -> BackendFactory:
    """The factory of a backend that needs no set-up or tear-down beyond ``make(...)``."""

    def factory(
        *, ttl: float, max_entries: int, clock: Clock
    ) -> AbstractAsyncContextManager[BlockIndex]:
        return nullcontext(make(ttl=ttl, max_entries=max_entries, clock=clock))

    return factory


# -- streams --------------------------------------------------------------------------------


def _keys_repr(keys: Sequence[int]) -> str:
    """``keys`` as Python, a repeated run written ``[1, 2] * 128``."""
    keys = list(keys)
    for period in range(1, len(keys) // 2 + 1):
        if len(keys) % period == 0 and keys == keys[:period] * (len(keys) // period):
            return f"{keys[:period]!r} * {len(keys) // period}"
    return repr(keys)


def _op_repr(op: IndexOp) -> str:
    if isinstance(op, ClearPod):
        return "ClearPod()"
    return f"{type(op).__name__}({_keys_repr(op.keys)}, Tier.{op.tier.name})"


def _pod_repr(pod: PodRank) -> str:
    return f"PodRank({pod.pod_id!r}, {pod.dp_rank})" if pod.dp_rank else f"PodRank({pod.pod_id!r})"


@dataclass(frozen=True, slots=True)
class Apply:
    """``apply(model, pod, ops)`` on both indexes."""

    model: str
    pod: PodRank
    ops: Sequence[IndexOp]

    def __repr__(self) -> str:
        ops = ", ".join(_op_repr(op) for op in self.ops)
        return f"Apply({self.model!r}, {_pod_repr(self.pod)}, [{ops}])"


@dataclass(frozen=True, slots=True)
class Advance:
    """The clock moves forward by ``seconds``."""

    seconds: float

    def __repr__(self) -> str:
        return f"Advance({self.seconds!r})"


@dataclass(frozen=True, slots=True)
class Sweep:
    """``sweep(budget)`` on both indexes; their returns must match too."""

    budget: int | None

    def __repr__(self) -> str:
        return f"Sweep({self.budget!r})"


@dataclass(frozen=True, slots=True)
class DropPod:
    """``drop_pod(pod_id)`` on both indexes."""

    pod_id: str

    def __repr__(self) -> str:
        return f"DropPod({self.pod_id!r})"


Step = Apply | Advance | Sweep | DropPod


@dataclass(frozen=True, slots=True)
class Stream:
    """The backend's settings and the steps to run; its repr is Python to paste in a test."""

    ttl: float
    capacity: int
    steps: Sequence[Step]

    def __repr__(self) -> str:
        lines = "".join(f"\n    {step!r}," for step in self.steps)
        return f"Stream(ttl={self.ttl!r}, capacity={self.capacity!r}, steps=[{lines}\n])"

    def _repr_pretty_(self, printer: RepresentationPrinter, cycle: bool) -> None:
        """How hypothesis prints a falsifying stream: as ``repr``, Python to paste."""
        printer.text(repr(self))


# -- configuration ----------------------------------------------------------------------------


def _key_values(count: int) -> tuple[int, ...]:
    # The extremes of uint64 early, where a native table's sentinel or sign bugs would be.
    return (1, 2, 0, 2**64 - 1, 3, 2**63, *range(4, count))[:count]


@dataclass(frozen=True, slots=True)
class Config:
    """The knobs (module docstring): what streams look like and how many run."""

    examples: int = 200
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 1000
    models: int = 2
    pods: int = 3
    keys: int = 8
    capacity: int = 12
    ttl: float = 0.3
    trace: bool = False
    shrink_seconds: float = 30.0
    model_names: tuple[str, ...] = field(init=False)
    pod_ranks: tuple[PodRank, ...] = field(init=False)
    key_values: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        pod_ids = [f"pod-{chr(ord('a') + i)}" for i in range(self.pods)]
        ranks = [PodRank(pod_id) for pod_id in pod_ids] + [PodRank(pod_ids[0], 1)]
        object.__setattr__(self, "model_names", tuple(f"m{i + 1}" for i in range(self.models)))
        object.__setattr__(self, "pod_ranks", tuple(sorted(ranks)))
        object.__setattr__(self, "key_values", _key_values(self.keys))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Config:
        """The defaults, overridden by any ``KV_CONFORMANCE_*`` variable set."""
        overrides: dict[str, object] = {}
        for name, (field_name, parse) in _KNOBS.items():
            value = environ.get(f"KV_CONFORMANCE_{name}", "").strip()
            if value:
                overrides[field_name] = parse(value)
        return cls(**overrides)  # type: ignore[arg-type]

    @property
    def pod_ids(self) -> list[str]:
        """The pod ids streams use, then one they never write (drops of it do nothing)."""
        return [*sorted({pod.pod_id for pod in self.pod_ranks}), UNKNOWN_POD.pod_id]

    def settings_tried(self) -> list[tuple[float, int]]:
        """(ttl, capacity) pairs hypothesis draws from: as configured, a tight capacity
        (40 steps seldom fill 12), unbounded, and a 1-tick TTL."""
        tight = max(1, self.capacity // 4)
        return [
            (self.ttl, self.capacity),
            (self.ttl, tight),
            (self.ttl, UNBOUNDED),
            (1 / 64, self.capacity),
        ]


def _seeds(value: str) -> tuple[int, ...]:
    return (random.SystemRandom().randrange(1 << 32),) if value == "random" else (int(value),)


_KNOBS: dict[str, tuple[str, Callable[[str], object]]] = {
    "EXAMPLES": ("examples", int),
    "SEED": ("seeds", _seeds),
    "STEPS": ("steps", int),
    "MODELS": ("models", int),
    "PODS": ("pods", int),
    "KEYS": ("keys", int),
    "CAPACITY": ("capacity", int),
    "TTL": ("ttl", float),
    "TRACE": ("trace", lambda value: value.lower() not in ("0", "false", "no")),
    "SHRINK_SECONDS": ("shrink_seconds", float),
}
"""``KV_CONFORMANCE_<NAME>`` -> the ``Config`` field it sets, and how to read it."""

# Copies per listed key: mostly one, sometimes enough to reach and pass saturation (255).
_REPEATS = (1,) * 16 + (128, 254, 255)
_BUDGETS = (None, None, 0, 1, 2, 5)


def _advances(ttl: float) -> list[float]:
    """Clock steps that land on and around a TTL's boundaries."""
    ticks = ttl_ticks(ttl)
    per_tick = 1 / TICKS_PER_SECOND
    return [
        per_tick,
        per_tick / 2,
        (ticks - 1) * per_tick,
        ticks * per_tick,
        (ticks + 1) * per_tick,
        3 * ticks * per_tick,
    ]


def _biased(values: Sequence[T]) -> st.SearchStrategy[T]:
    """The first value about half the time, else any: streams hitting one pod, model and
    tier again and again collide far more often than uniform ones."""
    return st.one_of(st.just(values[0]), st.sampled_from(values))


def _apply(
    model: str, pod: PodRank, tier: Tier, drawn: list[tuple[str, tuple[int, ...], Tier | None]]
) -> Apply:
    """An ``Apply`` from drawn (kind, keys, tier or None for the apply's own) triples."""
    ops: list[IndexOp] = []
    for kind, keys, own_tier in drawn:
        if kind == "clear":
            ops.append(ClearPod())
        else:
            op = StoreBlocks if kind == "store" else RemoveBlocks
            ops.append(op(keys, tier if own_tier is None else own_tier))
    return Apply(model, pod, tuple(ops))


def streams(config: Config) -> st.SearchStrategy[Stream]:
    """Hypothesis streams for ``config`` (up to 40 steps each)."""
    tiers = list(Tier)
    keys = st.builds(
        lambda listed, repeat: tuple(listed) * repeat,
        st.lists(st.sampled_from(config.key_values), min_size=1, max_size=6),
        st.sampled_from(_REPEATS),
    )
    drawn_ops = st.tuples(
        st.sampled_from(("store", "remove", "store", "remove", "clear")),
        keys,
        st.one_of(st.none(), st.sampled_from(tiers)),
    )
    applies = st.builds(
        _apply,
        st.sampled_from(config.model_names),
        st.sampled_from(config.pod_ranks),
        st.sampled_from(tiers),
        st.lists(drawn_ops, min_size=1, max_size=3),
    )
    drops = st.builds(DropPod, st.sampled_from(config.pod_ids))
    sweeps = st.builds(Sweep, st.sampled_from(_BUDGETS))

    def steps(ttl: float) -> st.SearchStrategy[list[Step]]:
        advances = st.one_of(
            st.sampled_from(_advances(ttl)),
            st.integers(0, 4 * ttl_ticks(ttl)).map(lambda halves: halves / 32),
        )
        step = st.one_of(applies, st.builds(Advance, advances), applies, sweeps, applies, drops)
        return st.lists(step, max_size=40)

    # Built once: a strategy built inside the composite would be rebuilt for every draw.
    tried = config.settings_tried()
    steps_for = {ttl: steps(ttl) for ttl, _ in tried}

    @st.composite
    def stream(draw: st.DrawFn) -> Stream:
        ttl, capacity = draw(st.sampled_from(tried))
        return Stream(ttl, capacity, tuple(draw(steps_for[ttl])))

    return stream()


def random_stream(config: Config, seed: int) -> Stream:
    """A plain-random stream of ``config.steps`` steps: the soak's, reproducible by seed."""
    rng = random.Random(seed)
    pod_ids = config.pod_ids
    advances = _advances(config.ttl)

    def block_keys() -> tuple[int, ...]:
        listed = rng.choices(config.key_values, k=rng.randint(1, 6))
        return tuple(listed) * rng.choice(_REPEATS)

    def op() -> IndexOp:
        roll = rng.random()
        tier = rng.choice(list(Tier))
        if roll < 0.5:
            return StoreBlocks(block_keys(), tier)
        if roll < 0.92:
            return RemoveBlocks(block_keys(), tier)
        return ClearPod()

    def step() -> Step:
        roll = rng.random()
        if roll < 0.6:
            ops = tuple(op() for _ in range(rng.randint(1, 3)))
            return Apply(rng.choice(config.model_names), rng.choice(config.pod_ranks), ops)
        if roll < 0.8:
            if rng.random() < 0.5:
                return Advance(rng.choice(advances))
            return Advance(rng.randint(0, 4 * ttl_ticks(config.ttl)) / 32)
        if roll < 0.95:
            return Sweep(rng.choice(_BUDGETS))
        return DropPod(rng.choice(pod_ids))

    return Stream(config.ttl, config.capacity, tuple(step() for _ in range(config.steps)))


# -- running and comparing ------------------------------------------------------------------


class Divergence(AssertionError):
    """The backend answered differently from the reference; ``step`` is where (0-based)."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class _Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


_Answer = dict[PodRank, tuple[int, int, dict[int, int]]]


def _answer(matches: list[PodMatch]) -> _Answer | str:
    answer: _Answer = {}
    for match in matches:
        if match.pod in answer:
            return f"{match.pod} answered twice: {matches!r}"
        answer[match.pod] = (match.match_length, match.block_count, dict(match.prefix_tiers))
    return answer


def _stats(stats: IndexStats) -> dict[str, object]:
    return {
        "entries": stats.entries,
        "entries_by_pod": dict(stats.entries_by_pod),
        "keys_by_model": dict(stats.keys_by_model),
        "evictions": dict(stats.evictions),
    }


@dataclass(frozen=True, slots=True)
class _Probe:
    model: str
    keys: tuple[int, ...]
    pods: tuple[PodRank, ...] | None

    def __str__(self) -> str:
        pods = None if self.pods is None else [str(p) for p in self.pods]
        return f"lookup({self.model!r}, {_keys_repr(self.keys)}, pods={pods})"


@dataclass(frozen=True, slots=True)
class _Universe:
    """The models, pods and keys a stream writes: what its lookups probe."""

    models: tuple[str, ...]
    pods: tuple[PodRank, ...]
    keys: tuple[int, ...]

    @classmethod
    def of(cls, stream: Stream) -> _Universe:
        models: set[str] = set()
        pods: set[PodRank] = set()
        keys: set[int] = set()
        for step in stream.steps:
            if isinstance(step, Apply):
                models.add(step.model)
                pods.add(step.pod)
                for op in step.ops:
                    if not isinstance(op, ClearPod):
                        keys.update(op.keys)
        return cls(tuple(sorted(models)), tuple(sorted(pods)), tuple(sorted(keys)))

    def probes(self, step: Step) -> list[_Probe]:
        """The lookups compared after ``step``: the whole key space in both directions
        and with a duplicate, plus the step's own key lists; for all pods, every other pod
        (and one unknown), and the step's pod."""
        keys = self.keys
        chains: list[tuple[int, ...]] = [(), keys, keys[::-1]]
        if keys:
            chains.append((keys[0], keys[0], *keys[1:2]))
        filters: list[tuple[PodRank, ...] | None] = [None, (*self.pods[::2], UNKNOWN_POD)]
        if isinstance(step, Apply):
            chains += [tuple(op.keys[:16]) for op in step.ops if not isinstance(op, ClearPod)]
            filters.append((step.pod, step.pod))  # listed twice, answered once
        return [
            _Probe(model, chain, pods)
            for model in self.models
            for chain in dict.fromkeys(chains)
            for pods in filters
        ]


async def _run_step(index: BlockIndex, step: Step) -> object:
    if isinstance(step, Apply):
        await index.apply(step.model, step.pod, step.ops)
    elif isinstance(step, Sweep):
        return await index.sweep(step.budget)
    elif isinstance(step, DropPod):
        await index.drop_pod(step.pod_id)
    return None


async def _difference(
    backend: BlockIndex, reference: BlockIndex, universe: _Universe, step: Step
) -> tuple[str, object, object] | None:
    """Run ``step`` on both, then compare; (what, backend's, reference's) if they differ."""
    found = await _run_step(backend, step)
    expected = await _run_step(reference, step)
    if found != expected:
        return "the step's return", found, expected
    for probe in universe.probes(step):
        matches = _answer(await backend.lookup(probe.model, probe.keys, probe.pods))
        wanted = _answer(await reference.lookup(probe.model, probe.keys, probe.pods))
        if matches != wanted:
            return str(probe), matches, wanted
    found_stats = _stats(await backend.stats())
    expected_stats = _stats(await reference.stats())
    for name, value in found_stats.items():
        if value != expected_stats[name]:
            return f"stats().{name}", value, expected_stats[name]
    return None


async def run_stream(factory: BackendFactory, stream: Stream, *, trace: bool = False) -> None:
    """Run ``stream`` through a fresh backend and a fresh reference; raise ``Divergence``
    at the first step after which they answer differently (or the backend raises)."""
    clock = _Clock()
    universe = _Universe.of(stream)
    reference = ReferenceIndex(ttl=stream.ttl, max_entries=stream.capacity, clock=clock)
    async with factory(ttl=stream.ttl, max_entries=stream.capacity, clock=clock) as backend:
        for number, step in enumerate(stream.steps):
            if trace:
                print(f"{number:>6}  {step!r}", flush=True)
            if isinstance(step, Advance):
                clock.now += step.seconds
            cause = None
            try:
                difference = await _difference(backend, reference, universe, step)
            except Exception as error:  # the backend's: the reference raises nothing here
                difference, cause = ("a call raised", error, "no exception"), error
            if difference is not None:
                what, found, expected = difference
                raise Divergence(
                    number,
                    f"after step {number} {step!r} (clock {clock.now!r}):\n"
                    f"  {what}\n    backend:   {found!r}\n    reference: {expected!r}",
                ) from cause


def check(factory: BackendFactory, stream: Stream, *, trace: bool = False) -> None:
    """``run_stream`` from synchronous code (one event loop per stream)."""
    asyncio.run(run_stream(factory, stream, trace=trace))


# -- the two modes ------------------------------------------------------------------------


def hypothesis_settings(config: Config) -> settings:
    """The differential test's settings; pass a variant to ``differential_test`` to tune."""
    return settings(
        max_examples=config.examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def differential_test(
    factory: BackendFactory,
    config: Config | None = None,
    test_settings: settings | None = None,
) -> Callable[[], None]:
    """A pytest test: hypothesis streams through ``factory``'s backend and the reference."""
    config = config or Config.from_env()

    @(test_settings or hypothesis_settings(config))
    @given(streams(config))
    def test_differential(stream: Stream) -> None:
        check(factory, stream, trace=config.trace)

    return test_differential


def _fails(factory: BackendFactory, stream: Stream, *, trace: bool = False) -> Divergence | None:
    try:
        check(factory, stream, trace=trace)
    except Divergence as failure:
        return failure
    return None


def _shrink(factory: BackendFactory, stream: Stream, seconds: float) -> tuple[Stream, Divergence]:
    """Greedy delta debugging: drop chunks of steps, then simplify each ``Apply``, keeping
    whatever still fails, until nothing more goes or ``seconds`` are spent."""
    deadline = time.monotonic() + seconds
    failure = _fails(factory, stream)
    assert failure is not None, "the stream to shrink must fail"
    stream = replace(stream, steps=tuple(stream.steps[: failure.step + 1]))

    def still_fails(steps: Sequence[Step]) -> bool:
        nonlocal stream, failure
        found = _fails(factory, replace(stream, steps=steps))
        if found is not None:
            stream, failure = replace(stream, steps=tuple(steps[: found.step + 1])), found
        return found is not None

    chunk = max(1, len(stream.steps) // 2)
    while time.monotonic() < deadline:
        start = 0
        while start < len(stream.steps) and time.monotonic() < deadline:
            steps = stream.steps
            if not still_fails((*steps[:start], *steps[start + chunk :])):
                start += chunk
        if chunk == 1:
            break
        chunk //= 2
    index = 0
    while index < len(stream.steps) and time.monotonic() < deadline:
        step, steps = stream.steps[index], stream.steps
        if not isinstance(step, Apply) or not any(
            still_fails((*steps[:index], simpler, *steps[index + 1 :]))
            for simpler in _simpler(step)
        ):
            index += 1  # else the step got simpler: try it again
    return stream, failure


def _simpler(step: Apply) -> list[Apply]:
    """``step`` one notch simpler: an op fewer, or one op with half its keys or a key fewer."""
    ops = step.ops
    simpler = [replace(step, ops=(*ops[:i], *ops[i + 1 :])) for i in range(len(ops))]
    for i, op in enumerate(ops):
        if isinstance(op, ClearPod) or len(op.keys) < 2:
            continue
        half = len(op.keys) // 2
        fewer = [op.keys[:half], op.keys[half:]]
        if len(op.keys) <= 16:
            fewer += [(*op.keys[:k], *op.keys[k + 1 :]) for k in range(len(op.keys))]
        for keys in fewer:
            simpler.append(replace(step, ops=(*ops[:i], replace(op, keys=keys), *ops[i + 1 :])))
    return [each for each in simpler if each.ops]


def soak(factory: BackendFactory, config: Config, seed: int) -> None:
    """One seeded plain-random stream; on a difference, raise it with the seed and the
    shrunk steps."""
    stream = random_stream(config, seed)
    failure = _fails(factory, stream, trace=config.trace)
    if failure is None:
        return
    shrunk, shrunk_failure = _shrink(factory, stream, config.shrink_seconds)
    raise Divergence(
        failure.step,
        f"soak seed {seed}: the backend diverged at step {failure.step} of {len(stream.steps)}"
        f" (reproduce: KV_CONFORMANCE_SEED={seed} KV_CONFORMANCE_STEPS={config.steps}"
        " KV_CONFORMANCE_TRACE=1, with the same MODELS/PODS/KEYS/CAPACITY/TTL)\n"
        f"{failure}\n\nshrunk to {len(shrunk.steps)} steps, which fail {shrunk_failure}\n"
        f"{shrunk!r}",
    )


def soak_test(factory: BackendFactory, config: Config | None = None) -> Callable[[], None]:
    """A pytest test: the seeded soak over every configured seed."""
    config = config or Config.from_env()

    def test_soak() -> None:
        for seed in config.seeds:
            print(f"soak seed {seed}: {config.steps} steps", flush=True)
            soak(factory, config, seed)

    return test_soak
