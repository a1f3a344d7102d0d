"""The command line: ``python -m loadtest.bench_service`` (see the package's docstring)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from loadtest.service_bench import runner
from loadtest.service_bench.daemon import Daemon, Pinning
from loadtest.service_bench.plan import FULL, LARGE_FILL, QUICK
from loadtest.service_bench.progress import Progress
from loadtest.service_bench.publishers import Publishers, PublisherSpec
from loadtest.service_bench.report import report
from loadtest.service_bench.results import Results
from loadtest.service_bench.workload import PREFIX_BLOCKS, check_encoder, make_prompt

__all__ = ["main"]

COMMAND = ".venv/bin/python -m loadtest.bench_service"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark: the running daemon -- query latency, event-to-visible lag, memory."
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests, a shorter ramp, no 10M fill (< 1 min)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    parser.add_argument("--rate", type=float, default=100_000.0, help="blocks/s under load")
    parser.add_argument(
        "--max-size", type=int, default=16_000_000, help="index.max_size (room for 10M and more)"
    )
    parser.add_argument(
        "--rss-10m",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"fill the index to {LARGE_FILL:,} entries at the end, for RSS (default: in full mode"
        " only; ~2.5 GiB and ~30 s)",
    )
    parser.add_argument(
        "--no-ramp", action="store_true", help="skip the ingest ramp (increasing offered rates)"
    )
    parser.add_argument(
        "--ramp-lag",
        type=float,
        default=5.0,
        metavar="MS",
        help="the ramp stops when the visible-lag p99 of a step passes this (ms)",
    )
    parser.add_argument(
        "--events-per-batch",
        type=int,
        default=1,
        help="32-block events per published batch under load (vLLM: one batch per step)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=str(RESULTS),
        help="write service.md and service.json here (service-quick.* in quick mode);"
        " default loadtest/results",
    )
    parser.add_argument("--no-save", action="store_true", help="print the report only")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the daemon and the publishers, run every phase, print the report."""
    args = parse_args(argv)
    check_encoder()
    plan = QUICK if args.quick else FULL
    if args.rss_10m is not None:
        plan = replace(plan, large_fill=args.rss_10m)
    if args.no_ramp:
        plan = replace(plan, ramp_rates=())
    if plan.large_fill and args.max_size < LARGE_FILL * 1.1:
        raise SystemExit(f"--rss-10m needs --max-size >= {LARGE_FILL * 1.1:,.0f}")
    pinning = Pinning.plan(not args.no_pin)
    results = Results(
        mode="quick" if args.quick else "full",
        pinned=pinning.describe(),
        cpus=len(pinning.cpus),
        rate_target=args.rate,
        max_size=args.max_size,
        events_per_batch=args.events_per_batch,
        ramp_lag_threshold=args.ramp_lag / 1e3,
    )
    progress = Progress(enabled=not args.no_progress)
    if pinning.client:
        os.sched_setaffinity(0, pinning.client)
    progress.step(f"starting the daemon ({results.pinned})")
    daemon = Daemon(max_size=args.max_size, cpus=pinning.daemon)
    publishers: Publishers | None = None
    try:
        daemon.wait_ready()
        progress.step(f"daemon ready (pid {daemon.pid}); starting {len(PREFIX_BLOCKS)} publishers")
        prompt = tuple(make_prompt())
        specs = [
            PublisherSpec(
                i, daemon.zmq_endpoint, pinning.client, prompt, blocks, args.events_per_batch
            )
            for i, blocks in enumerate(PREFIX_BLOCKS)
        ]
        publishers = Publishers(specs)
        publishers.wait_ready(60.0)
        asyncio.run(runner.run(daemon, publishers, plan, results, progress, args.rate))
        results.daemon_log = daemon.log_summary()
    finally:
        if publishers is not None:
            publishers.close()
        code = daemon.stop()
        progress.step(f"daemon stopped (exit {code})")
        if code not in (0, None):
            print(daemon.logs()[-4000:], file=sys.stderr)
        daemon.close()
    given = list(sys.argv[1:] if argv is None else argv)
    for flag, value in (("--json", args.json), ("--out", args.out)):
        if value:  # where the results went is not part of the setup
            given = [a for a in given if a not in (flag, value) and a != f"{flag}={value}"]
    command = COMMAND + "".join(f" {a}" for a in given)
    text = report(results, command)
    print(text)
    data = json.dumps({"command": command, **asdict(results)}, indent=2)
    if args.json:
        Path(args.json).write_text(data)
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "service-quick" if args.quick else "service"
        (out / f"{stem}.md").write_text(f"# Service benchmark\n\n{text}\n")
        (out / f"{stem}.json").write_text(data + "\n")
        progress.step(f"wrote {out / stem}.md and .json")
    return 0
