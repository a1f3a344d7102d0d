"""Benchmark the block-key schemes on one long prompt.

    .venv/bin/python -m loadtest.bench_keys [--tokens 8192] [--block-size 16] [--cpu 0]

Times ``block_keys`` for one prompt of random token ids (one call = the whole prompt, as a
query does) in ``tokens`` mode and in ``vllm`` mode with both algorithms, and prints
p50/p99 per call against the tokens-mode target. GC stays on, as in the service.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.index.keys import TokenKeys, VllmKeys

TARGET_US = 300.0
"""Tokens mode, 8192 tokens at block size 16, one core."""


@dataclass(frozen=True)
class Result:
    name: str
    runs: int
    p50_us: float
    p99_us: float
    mean_us: float


def measure(name: str, call: Callable[[], object], runs: int, warmup: int) -> Result:
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(runs):
        start = clock()
        call()
        samples.append(clock() - start)
    samples.sort()
    return Result(
        name=name,
        runs=runs,
        p50_us=samples[len(samples) // 2] / 1000,
        p99_us=samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000,
        mean_us=sum(samples) / len(samples) / 1000,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5000, help="tokens-mode calls")
    parser.add_argument("--vllm-runs", type=int, default=500, help="vllm-mode calls each")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (Linux)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    rng = random.Random(42)
    # Qwen/Llama-sized vocabulary; the values do not change the cost, the count does.
    prompt = [rng.randrange(151_000) for _ in range(args.tokens)]
    bs = args.block_size
    tokens = TokenKeys()
    pickle_keys = VllmKeys("sha256", "0")
    cbor_keys = VllmKeys("sha256_cbor", "0")

    results = [
        measure("tokens", lambda: tokens.block_keys(prompt, bs), args.runs, args.runs // 10),
        measure(
            "tokens, lora+salt",
            lambda: tokens.block_keys(prompt, bs, lora_name="adapter", cache_salt="tenant"),
            args.runs,
            args.runs // 10,
        ),
        measure(
            "vllm sha256 (pickle)",
            lambda: pickle_keys.block_keys(prompt, bs),
            args.vllm_runs,
            args.vllm_runs // 10,
        ),
        measure(
            "vllm sha256_cbor",
            lambda: cbor_keys.block_keys(prompt, bs),
            args.vllm_runs,
            args.vllm_runs // 10,
        ),
    ]
    # vllm mode also hashes every BlockStored to check it: an event continuing a chain.
    event_blocks = min(16, args.tokens // bs - 1)
    head = pickle_keys.block_keys(prompt[:bs], bs, remember=True)
    event = prompt[bs : bs * (1 + event_blocks)]
    event_hashes = pickle_keys.block_keys(event, bs, parent=head[0])
    results.append(
        measure(
            f"vllm check, {event_blocks}-block event",
            lambda: pickle_keys.check_published(event, bs, event_hashes, parent=head[0]),
            args.runs,
            args.runs // 10,
        )
    )

    blocks = args.tokens // bs
    print(
        f"{args.tokens} tokens, block size {bs} ({blocks} blocks); Python "
        f"{platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs{'' if args.cpu is None else f', pinned to CPU {args.cpu}'}"
    )
    print(f"{'scheme':28} {'runs':>6} {'p50 us':>9} {'p99 us':>9} {'mean us':>9} {'ns/block':>9}")
    for r, n in zip(results, [blocks] * 4 + [event_blocks], strict=True):
        print(
            f"{r.name:28} {r.runs:6d} {r.p50_us:9.1f} {r.p99_us:9.1f} {r.mean_us:9.1f} "
            f"{r.p50_us * 1000 / max(n, 1):9.0f}"
        )
    tokens_result = results[0]
    ok = tokens_result.p99_us <= TARGET_US
    print(
        f"tokens mode vs target {TARGET_US:.0f} us: p50 {tokens_result.p50_us:.1f} us, "
        f"p99 {tokens_result.p99_us:.1f} us -> {'within' if ok else 'OVER'} target"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
