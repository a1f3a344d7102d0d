"""Routing quality: simulated vLLM engines, the real daemon, routers compared in one run.

    .venv/bin/python -m loadtest.sim --quick        # ~1 minute: the table and charts
    .venv/bin/python -m loadtest.sim                # the full run (4x the traffic)

Writes ``routing[-quick].md`` (table and target verdicts), ``.json`` (raw numbers) and
three PNG charts to ``loadtest/results/``; prints the table. See docs/performance.md,
"Routing quality (issue 5)", for how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq.asyncio

from loadtest.sim.daemon import Daemon, PodEndpoints
from loadtest.sim.engine import ServiceTime, SimEngine
from loadtest.sim.publisher import EventPublisher
from loadtest.sim.report import Setup, WorkloadInfo, markdown, write_charts, write_json
from loadtest.sim.routers import (
    ApproximateMatches,
    OracleMatches,
    PreciseMatches,
    PrefixRouter,
    RandomChoice,
    RoundRobin,
    Router,
)
from loadtest.sim.simulator import ClusterConfig, EventLink, RunResult, make_engines, simulate
from loadtest.sim.workloads import GENERATORS, Workload, WorkloadShape, trace

ROOT = Path(__file__).resolve().parents[2]
ROUTERS = (
    "round-robin",
    "random",
    "approx",
    "approx+load",
    "precise",
    "precise+load",
    "oracle",
    "oracle+load",
)
# Sessions (chat, agentic) or requests (rag, control) per workload at --scale 1.
BASE_SIZES = {"chat": 240, "rag": 1200, "agentic": 80, "control": 800}
QUICK_SCALE = 1.0
FULL_SCALE = 4.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sim",
        description="Compare routers on simulated vLLM engines feeding the real daemon.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads (~1 minute)")
    parser.add_argument("--scale", type=float, help="workload size multiplier (quick 1, full 4)")
    parser.add_argument("--workloads", default="chat,rag,agentic,control")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--trace", type=Path, help="also replay this JSONL trace")
    parser.add_argument("--trace-limit", type=int, help="first N records of the trace")
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--cache-blocks", type=int, default=2048, help="KV blocks per engine")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--load", type=float, default=0.7, help="offered load, uncached")
    parser.add_argument("--wire", choices=("0.33", "0.23"), default="0.33")
    parser.add_argument("--event-lag-ms", type=float, default=5.0, help="simulated")
    parser.add_argument(
        "--replay-buffer",
        type=int,
        default=2000,
        help="batches each engine keeps for replay (vLLM's buffer_steps; its default is 10000)",
    )
    parser.add_argument("--approx-ttl", type=float, default=120.0, help="seconds (simulated)")
    parser.add_argument("--load-penalty", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results")
    parser.add_argument("--name", help="output file prefix (default routing[-quick])")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.routers = [r for r in args.routers.split(",") if r]
    for name in args.workloads:
        if name not in GENERATORS:
            parser.error(f"unknown workload {name!r}; choose from {', '.join(GENERATORS)}")
    for name in args.routers:
        if name not in ROUTERS:
            parser.error(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else FULL_SCALE
    if args.name is None:
        args.name = "routing-quick" if args.quick else "routing"
    return args


def build_workloads(args: argparse.Namespace, shape: WorkloadShape) -> list[Workload]:
    workloads = []
    for number, name in enumerate(args.workloads):
        size = max(1, round(BASE_SIZES[name] * args.scale))
        rng = random.Random(f"{args.seed}/{number}/{name}")
        workloads.append(GENERATORS[name](rng, shape, size))
    if args.trace is not None:
        rng = random.Random(f"{args.seed}/trace")
        workloads.append(trace(args.trace, rng, shape, limit=args.trace_limit))
    return workloads


class Progress:
    """A tqdm bar over simulated requests on stderr (a silent one with --no-progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            tqdm: Any = importlib.import_module("tqdm").tqdm
            self._bar = tqdm(total=total, unit="req", smoothing=0.1, dynamic_ncols=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def router_for(
    name: str,
    args: argparse.Namespace,
    engines: Sequence[SimEngine],
    daemon: Daemon | None,
    model: str,
) -> Router:
    count = len(engines)
    penalty = args.load_penalty if name.endswith("+load") else 0.0
    base = name.removesuffix("+load")
    if base == "round-robin":
        return RoundRobin(count)
    if base == "random":
        return RandomChoice(count, args.seed)
    if base == "approx":
        return PrefixRouter(name, ApproximateMatches(count, args.approx_ttl), load_penalty=penalty)
    if base == "oracle":
        return PrefixRouter(name, OracleMatches(engines), load_penalty=penalty)
    assert base == "precise" and daemon is not None
    pods = [engine.pod_id for engine in engines]
    return PrefixRouter(name, PreciseMatches(daemon, model, pods), load_penalty=penalty)


async def run_all(
    args: argparse.Namespace,
    config: ClusterConfig,
    workloads: Sequence[Workload],
    progress: Progress,
) -> list[RunResult]:
    needs_daemon = any(r.startswith("precise") for r in args.routers)
    context = zmq.asyncio.Context()
    publishers = [
        EventPublisher(
            context, config.pod_id(i), version=args.wire, buffer_steps=args.replay_buffer
        )
        for i in range(config.engines)
    ]
    daemon: Daemon | None = None
    results = []
    try:
        if needs_daemon:
            progress.describe("starting the daemon")
            for publisher in publishers:
                publisher.start()
            daemon = Daemon(
                [PodEndpoints(p.pod_id, p.endpoint, p.replay_endpoint) for p in publishers]
            )
            await daemon.start()
            for publisher in publishers:
                async with asyncio.timeout(30.0):
                    await publisher.wait_subscribed()
        for workload in workloads:
            for name in args.routers:
                progress.describe(f"{workload.name} / {name}")
                uses_daemon = name.startswith("precise")
                engines = make_engines(config, publish=uses_daemon)
                model = f"sim/{workload.name}/{name}"
                router = router_for(name, args, engines, daemon, model)
                link = None
                if uses_daemon:
                    assert daemon is not None
                    link = EventLink(daemon, publishers, model, config.event_lag)
                result = await simulate(
                    workload, router, engines, link=link, on_request=progress.step
                )
                results.append(result)
    finally:
        if daemon is not None:
            await daemon.stop()
        for publisher in publishers:
            await publisher.close()
        context.term()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    timing = ServiceTime()
    config = ClusterConfig(
        engines=args.engines,
        capacity_blocks=args.cache_blocks,
        timing=timing,
        event_lag=args.event_lag_ms / 1000,
    )
    shape = WorkloadShape(args.engines, timing, load=args.load, block_size=args.block_size)
    print("building workloads ...", file=sys.stderr)
    workloads = build_workloads(args, shape)
    infos = []
    for workload in workloads:
        largest = workload.max_request_blocks()
        if largest > args.cache_blocks:
            print(
                f"error: a {workload.name} request needs {largest} blocks, more than one"
                f" engine's {args.cache_blocks}; raise --cache-blocks",
                file=sys.stderr,
            )
            return 2
        infos.append(
            WorkloadInfo(
                workload.name,
                workload.description,
                workload.requests,
                workload.distinct_blocks(),
                args.engines * args.cache_blocks,
            )
        )
    total = sum(w.requests for w in workloads) * len(args.routers)
    progress = Progress(total, enabled=not args.no_progress)
    try:
        results = asyncio.run(run_all(args, config, workloads, progress))
    finally:
        progress.close()
    rows = [r.summary() for r in results]
    command = "python -m loadtest.sim " + shlex.join(
        list(argv if argv is not None else sys.argv[1:])
    )
    setup = Setup(
        command=command.strip(),
        engines=args.engines,
        capacity_blocks=args.cache_blocks,
        block_size=args.block_size,
        wire=args.wire,
        event_lag_ms=args.event_lag_ms,
        approx_ttl_s=args.approx_ttl,
        load_penalty=args.load_penalty,
        load=args.load,
        seed=args.seed,
        timing=_describe(timing),
    )
    table = markdown(setup, infos, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / args.name
    prefix.with_suffix(".md").write_text(table)
    write_json(prefix.with_suffix(".json"), setup, infos, rows)
    written = [prefix.with_suffix(".md"), prefix.with_suffix(".json")]
    if not args.no_charts:
        written += write_charts(prefix, rows)
    print(table)
    print(f"wrote {', '.join(_shown(p) for p in written)}", file=sys.stderr)
    print(f"took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


def _describe(timing: ServiceTime) -> str:
    return (
        f"prefill {timing.prefill_overhead * 1000:g} ms + {timing.prefill_per_token * 1e6:g} us"
        f"/uncached token, decode {timing.decode_per_token * 1000:g} ms/token"
    )


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
