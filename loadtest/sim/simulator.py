"""Discrete-event simulation of one workload on N simulated engines behind one router.

The clock is simulated, so a run takes as long as its computation, not its traffic. What
is real is the daemon: with the ``precise`` router, every engine step's events are
published on the engine's ZeroMQ socket, and before each routing decision the simulator
publishes every batch due by then (a step's batch is due ``event_lag`` after the step)
and waits until the daemon reports it applied (``last_seq`` per engine). The daemon's
answers therefore depend on simulated time only, never on the machine's speed.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtest.sim.daemon import Daemon
from loadtest.sim.engine import Request, ServiceTime, SimEngine
from loadtest.sim.publisher import EventPublisher
from loadtest.sim.routers import Loads, Router
from loadtest.sim.workloads import Turn, Workload
from tests.support.vllm_wire import WireEvent, cleared

__all__ = ["ClusterConfig", "EventLink", "RunResult", "make_engines", "quantile", "simulate"]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    engines: int = 4
    capacity_blocks: int = 2048
    """KV blocks per engine (block size 16: 32,768 tokens)."""
    max_running: int = 64
    timing: ServiceTime = field(default_factory=ServiceTime)
    event_lag: float = 0.005
    """Simulated seconds from an engine step to its events reaching the daemon."""

    def pod_id(self, index: int) -> str:
        return f"10.0.0.{index + 1}:8000"


def make_engines(config: ClusterConfig, *, publish: bool) -> list[SimEngine]:
    return [
        SimEngine(
            i,
            config.pod_id(i),
            capacity_blocks=config.capacity_blocks,
            timing=config.timing,
            max_running=config.max_running,
            publish=publish,
        )
        for i in range(config.engines)
    ]


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(slots=True)
class RunResult:
    workload: str
    router: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list, repr=False)
    route_seconds: list[float] = field(default_factory=list, repr=False)
    per_engine: list[int] = field(default_factory=list)
    evictions: int = 0
    batches: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def imbalance(self) -> float:
        """Most requests on one engine / mean requests per engine."""
        mean = sum(self.per_engine) / len(self.per_engine) if self.per_engine else 0.0
        return max(self.per_engine) / mean if mean else 0.0

    def summary(self) -> dict[str, float | int | str]:
        return {
            "workload": self.workload,
            "router": self.router,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": self.hit_rate,
            "ttft_p50_s": quantile(self.ttft, 0.5),
            "ttft_p90_s": quantile(self.ttft, 0.9),
            "imbalance": self.imbalance,
            "route_p50_us": quantile(self.route_seconds, 0.5) * 1e6,
            "route_p99_us": quantile(self.route_seconds, 0.99) * 1e6,
            "evictions": self.evictions,
            "batches": self.batches,
            "sim_seconds": self.sim_seconds,
            "wall_seconds": self.wall_seconds,
        }


class EventLink:
    """Carries engine steps to the daemon ``lag`` simulated seconds later, in order.

    The publishers outlive a run: each run names its own model in the topic, so runs do
    not see each other's blocks, and sequence numbers carry on as one engine's would.
    """

    def __init__(
        self,
        daemon: Daemon,
        publishers: Sequence[EventPublisher],
        model: str,
        lag: float,
    ) -> None:
        self.daemon = daemon
        self.model = model
        self.batches = 0
        self._publishers = publishers
        self._lag = lag
        self._due: deque[tuple[float, int, list[WireEvent]]] = deque()
        self._unconfirmed: dict[str, int] = {}

    def add(self, now: float, engine: int, events: list[WireEvent]) -> None:
        self._due.append((now + self._lag, engine, events))

    async def catch_up(self, now: float) -> None:
        """Publish every batch due by ``now``; return when the daemon has applied them."""
        due = self._due
        while due and due[0][0] <= now:
            _, engine, events = due.popleft()
            await self._publish(engine, events)
        if self._unconfirmed:
            await self.daemon.wait_applied(self._unconfirmed)
            self._unconfirmed = {}

    async def close(self) -> None:
        """Publish what is left and clear every engine's blocks of this run's model."""
        await self.catch_up(math.inf)
        for engine in range(len(self._publishers)):
            await self._publish(engine, [cleared()])
        await self.catch_up(math.inf)

    async def _publish(self, engine: int, events: list[WireEvent]) -> None:
        publisher = self._publishers[engine]
        self._unconfirmed[publisher.pod_id] = await publisher.publish(self.model, events)
        self.batches += 1


_FINISH, _PREFILL_DONE, _ARRIVAL = 0, 1, 2  # at equal times: free resources first


async def simulate(
    workload: Workload,
    router: Router,
    engines: Sequence[SimEngine],
    *,
    link: EventLink | None = None,
    on_request: Callable[[], None] | None = None,
) -> RunResult:
    """Run every session of ``workload`` through ``router`` onto ``engines``."""
    began = time.perf_counter()
    result = RunResult(workload.name, router.name)
    loads = Loads([0] * len(engines))
    heap: list[tuple[float, int, int, Request]] = []
    order = 0

    def push(at: float, kind: int, request: Request) -> None:
        nonlocal order
        order += 1
        heapq.heappush(heap, (at, kind, order, request))

    def start(engine: SimEngine, now: float) -> None:
        started = engine.start_next(now)
        if started is not None:
            push(started.first_token, _PREFILL_DONE, started)

    sessions = workload.sessions
    for number, session in enumerate(sessions):
        turn = session.turns[0]
        push(session.start, _ARRIVAL, Request(session.chain, *_sizes(turn), session.start, number))

    now = 0.0
    while heap:
        now, kind, _, request = heapq.heappop(heap)
        if kind == _ARRIVAL:
            if link is not None:
                await link.catch_up(now)
            clock = time.perf_counter()
            chosen = await router.route(request, loads, now)
            result.route_seconds.append(time.perf_counter() - clock)
            request.engine = chosen
            loads.inflight[chosen] += 1
            engine = engines[chosen]
            engine.enqueue(request)
            start(engine, now)
        elif kind == _PREFILL_DONE:
            engine = engines[request.engine]
            push(engine.prefill_done(request), _FINISH, request)
            start(engine, now)
        else:
            engine = engines[request.engine]
            engine.finish(request, now)
            loads.inflight[request.engine] -= 1
            _record(result, request)
            if on_request is not None:
                on_request()
            session = sessions[request.session]
            following = request.turn + 1
            if following < len(session.turns):
                turn = session.turns[following]
                at = now + session.turns[request.turn].think
                push(
                    at,
                    _ARRIVAL,
                    Request(session.chain, *_sizes(turn), at, request.session, following),
                )
            start(engine, now)
        if link is not None:
            events = engine.take_events()
            if events:
                link.add(now, engine.index, events)

    stuck = sum(len(engine.queue) for engine in engines)
    if stuck:
        raise RuntimeError(f"{stuck} requests never started: a request needs more blocks")
    if link is not None:
        await link.close()
        result.batches = link.batches
    result.per_engine = [engine.served for engine in engines]
    result.evictions = sum(engine.cache.evictions for engine in engines)
    result.sim_seconds = now
    result.wall_seconds = time.perf_counter() - began
    return result


def _sizes(turn: Turn) -> tuple[int, int]:
    return turn.prompt_len, turn.output_len


def _record(result: RunResult, request: Request) -> None:
    result.requests += 1
    result.prompt_tokens += request.prompt_len
    result.cached_tokens += request.cached_tokens
    result.ttft.append(request.ttft)
