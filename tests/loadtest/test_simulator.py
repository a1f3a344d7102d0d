"""The simulation end to end: the real daemon sees what the engines hold; runs repeat."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import zmq.asyncio

from loadtest.sim.daemon import Daemon, PodEndpoints
from loadtest.sim.engine import Request, ServiceTime
from loadtest.sim.publisher import EventPublisher
from loadtest.sim.routers import (
    ApproximateMatches,
    OracleMatches,
    PreciseMatches,
    PrefixRouter,
    RoundRobin,
)
from loadtest.sim.simulator import ClusterConfig, EventLink, make_engines, simulate
from loadtest.sim.workloads import Workload, WorkloadShape, chat, control, rag, trace
from tests.support.vllm_wire import Version

CONFIG = ClusterConfig(engines=3, capacity_blocks=400, event_lag=0.0)
SHAPE = WorkloadShape(CONFIG.engines, CONFIG.timing, load=0.8)


def small_chat(seed: int = 5) -> Workload:
    return chat(random.Random(seed), SHAPE, 12)


class CheckedPrecise:
    """The daemon's answer, checked against the engines' caches at every decision."""

    def __init__(self, precise: PreciseMatches, oracle: OracleMatches) -> None:
        self.precise = precise
        self.oracle = oracle
        self.checked = 0
        self.nonzero = 0

    async def match_blocks(self, request: Request, now: float) -> Sequence[int]:
        got = await self.precise.match_blocks(request, now)
        assert list(got) == list(await self.oracle.match_blocks(request, now))
        self.checked += 1
        self.nonzero += any(got)
        return got

    def record(self, request: Request, engine: int, now: float) -> None:
        pass


def test_the_daemon_sees_exactly_what_the_engines_hold() -> None:
    """With no event lag, every answer of the real daemon (gRPC) equals the caches, over
    both wire formats (engines 0-1 publish vLLM 0.33 maps, engine 2 0.23 arrays), through
    evictions, and through the replay that fills in the daemon's first contact."""

    async def scenario() -> None:
        context = zmq.asyncio.Context()
        versions: tuple[Version, ...] = ("0.33", "0.33", "0.23")
        publishers = [
            EventPublisher(context, CONFIG.pod_id(i), version=v) for i, v in enumerate(versions)
        ]
        for publisher in publishers:
            publisher.start()
        pods = [PodEndpoints(p.pod_id, p.endpoint, p.replay_endpoint) for p in publishers]
        try:
            async with Daemon(pods) as daemon:
                for publisher in publishers:
                    async with asyncio.timeout(10.0):
                        await publisher.wait_subscribed()
                for workload in (small_chat(), rag(random.Random(2), SHAPE, 60, documents=12)):
                    engines = make_engines(CONFIG, publish=True)
                    model = f"test/{workload.name}"
                    pod_ids = [e.pod_id for e in engines]
                    source = CheckedPrecise(
                        PreciseMatches(daemon, model, pod_ids), OracleMatches(engines)
                    )
                    router = PrefixRouter("checked", source, load_penalty=0.3)
                    link = EventLink(daemon, publishers, model, lag=0.0)
                    result = await simulate(workload, router, engines, link=link)
                    assert source.checked == result.requests == workload.requests
                    assert source.nonzero > result.requests / 2
                    assert result.evictions > 0
                    # The run's close cleared every engine in the daemon.
                    probe = workload.sessions[0].chain.tokens[:64].tolist()
                    assert await daemon.match_lengths(model, probe) == {}
            assert sum(p.replays for p in publishers) >= len(publishers)
        finally:
            for publisher in publishers:
                await publisher.close()
            context.term()

    asyncio.run(scenario())


def test_runs_are_deterministic_and_prefix_routing_beats_round_robin() -> None:
    workload = small_chat()

    async def run(kind: str) -> dict[str, float | int | str]:
        engines = make_engines(CONFIG, publish=False)
        router = (
            RoundRobin(len(engines))
            if kind == "rr"
            else PrefixRouter("oracle", OracleMatches(engines), load_penalty=0.3)
        )
        summary = (await simulate(workload, router, engines)).summary()
        for wall_clock in ("route_p50_us", "route_p99_us", "wall_seconds"):
            del summary[wall_clock]
        return summary

    first, second = asyncio.run(run("oracle")), asyncio.run(run("oracle"))
    assert first == second
    baseline = asyncio.run(run("rr"))
    assert float(str(first["hit_rate"])) > float(str(baseline["hit_rate"]))
    assert first["requests"] == baseline["requests"] == workload.requests


def test_workloads_are_seeded_and_shaped() -> None:
    one, two = small_chat(9), small_chat(9)
    assert [s.chain.hashes for s in one.sessions] == [s.chain.hashes for s in two.sessions]
    assert [s.start for s in one.sessions] == [s.start for s in two.sessions]
    assert [s.chain.hashes for s in small_chat(10).sessions] != [
        s.chain.hashes for s in one.sessions
    ]
    # Chat turns grow one context: each prompt extends the previous turn's prompt + output.
    for session in one.sessions:
        for before, after in zip(session.turns, session.turns[1:], strict=False):
            assert after.prompt_len > before.prompt_len + before.output_len
    # The control workload shares nothing; chat shares system prompts across sessions.
    unshared = control(random.Random(1), SHAPE, 30)
    firsts = [s.chain.hashes[0] for s in unshared.sessions]
    assert len(set(firsts)) == len(firsts)
    assert len({s.chain.hashes[0] for s in one.sessions}) <= 4


def test_trace_replays_token_ids_and_text(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    records = [
        {"timestamp": 100.5, "token_ids": list(range(40)), "output_tokens": 8},
        {"timestamp": 100.0, "text": "the same words give the same blocks " * 4},
        {"timestamp": 101.0, "text": "the same words give the same blocks " * 4},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    workload = trace(path, random.Random(0), SHAPE)
    assert [s.start for s in workload.sessions] == [0.0, 0.5, 1.0]
    assert [s.turns[0].prompt_len for s in workload.sessions] == [28, 40, 28]
    assert workload.sessions[1].turns[0].output_len == 8
    assert workload.sessions[0].chain.hashes[0] == workload.sessions[2].chain.hashes[0]

    path.write_text('{"timestamp": 1, "token_ids": [-1]}\n')
    with pytest.raises(ValueError, match=r"trace\.jsonl:1"):
        trace(path, random.Random(0), SHAPE)


def test_approximate_router_forgets_after_its_ttl() -> None:
    source = ApproximateMatches(engines=2, ttl=10.0)
    workload = small_chat()
    session = workload.sessions[0]
    turn = session.turns[0]
    request = Request(session.chain, turn.prompt_len, turn.output_len, 0.0)
    blocks = len(request.prompt_hashes)

    async def matches(now: float) -> list[int]:
        return list(await source.match_blocks(request, now))

    assert asyncio.run(matches(0.0)) == [0, 0]
    source.record(request, 1, 0.0)
    assert asyncio.run(matches(5.0)) == [0, blocks]
    assert asyncio.run(matches(10.5)) == [0, 0]
    source.record(request, 0, 11.0)  # prunes the expired entries on the way
    assert source.entries == blocks


def test_service_time_defaults_are_what_the_docs_say() -> None:
    timing = ServiceTime()
    assert timing.prefill(1000) == pytest.approx(0.21)
    assert timing.decode(100) == pytest.approx(1.0)
