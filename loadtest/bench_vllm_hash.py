"""Benchmark vLLM's block hash: the native ``VllmHasher`` against Python's ``VllmKeys``.

    .venv/bin/python -m loadtest.bench_vllm_hash [--tokens 8192] [--block-size 16] [--cpu 0]

Times one query's keys (the whole prompt in one call) with both algorithms, and the
self-check of a 16-block ``BlockStored`` continuing a chain, each natively (GIL released,
token ids already packed as uint32, as the gRPC ``token_ids_packed`` path has them) and in
Python (a list of ints, as the reference takes them). GC stays on.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
from array import array
from typing import Literal

from loadtest.bench_keys import Result, measure
from service import _dataplane
from service.index.keys import TOKEN_TYPECODE, VllmKeys

Algorithm = Literal["sha256", "sha256_cbor"]


def query_pair(
    algorithm: Algorithm,
    prompt: list[int],
    packed: array[int],
    bs: int,
    runs: int,
    python_runs: int,
) -> tuple[Result, Result]:
    """One query's keys, natively and in Python, after checking that they agree."""
    native = _dataplane.VllmHasher(algorithm, "0")
    python = VllmKeys(algorithm, "0")
    assert native.block_keys(packed, bs) == python.block_keys(prompt, bs)
    name = f"query, {algorithm}"
    return (
        measure(name, lambda: native.block_keys(packed, bs), runs, 50),
        measure(name, lambda: python.block_keys(prompt, bs), python_runs, 20),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2000, help="native calls each")
    parser.add_argument("--python-runs", type=int, default=300, help="Python calls each")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (Linux)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    rng = random.Random(42)
    prompt = [rng.randrange(151_000) for _ in range(args.tokens)]
    packed = array(TOKEN_TYPECODE, prompt)
    bs = args.block_size
    rows: list[tuple[Result, Result, int]] = []
    algorithms: list[Algorithm] = ["sha256", "sha256_cbor"]
    for algorithm in algorithms:
        fast, slow = query_pair(algorithm, prompt, packed, bs, args.runs, args.python_runs)
        rows.append((fast, slow, args.tokens // bs))

    # vLLM's default algorithm checking an event that continues a remembered chain.
    event_blocks = min(16, args.tokens // bs - 1)
    event = prompt[bs : bs * (1 + event_blocks)]
    event_packed = array(TOKEN_TYPECODE, event)
    native = _dataplane.VllmHasher("sha256", "0")
    python = VllmKeys("sha256", "0")
    head = native.block_keys(packed[:bs], bs, remember=True)
    python.block_keys(prompt[:bs], bs, remember=True)
    hashes = python.block_keys(event, bs, parent=head[0])
    assert native.check_published(event_packed, bs, hashes, head[0]) == "match"
    rows.append(
        (
            measure(
                f"check, {event_blocks} blocks",
                lambda: native.check_published(event_packed, bs, hashes, head[0]),
                args.runs * 5,
                200,
            ),
            measure(
                f"check, {event_blocks} blocks",
                lambda: python.check_published(event, bs, hashes, parent=head[0]),
                args.runs,
                100,
            ),
            event_blocks,
        )
    )

    print(
        f"{args.tokens} tokens, block size {bs}; Python {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
        f"{'' if args.cpu is None else f', pinned to CPU {args.cpu}'}"
    )
    print(
        f"{'workload':24} {'native p50':>11} {'p99':>8} {'ns/block':>9} "
        f"{'Python p50':>11} {'p99':>8} {'ns/block':>9} {'speedup':>8}"
    )
    for fast, slow, blocks in rows:
        print(
            f"{fast.name:24} {fast.p50_us:9.1f}us {fast.p99_us:6.1f}us "
            f"{fast.p50_us * 1000 / blocks:9.0f} {slow.p50_us:9.1f}us {slow.p99_us:6.1f}us "
            f"{slow.p50_us * 1000 / blocks:9.0f} {slow.p50_us / fast.p50_us:7.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
