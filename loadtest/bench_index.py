"""Benchmark: index lookups over 1M entries, and memory per (block, pod) entry.

Run: ``.venv/bin/python -m loadtest.bench_index [--entries 1000000] [--pods 8]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Sequence

from service.index.memory import MemoryIndex
from service.index.protocol import PodRank, StoreBlocks

CHAIN = 64


async def populate(index: MemoryIndex, pods: Sequence[PodRank], entries: int, seed: int) -> None:
    """Chains of 64 blocks; one in five chains is also cached by a second pod."""
    rng = random.Random(seed)
    stored = 0
    while stored < entries:
        keys = [rng.getrandbits(64) for _ in range(CHAIN)]
        first = rng.randrange(len(pods))
        await index.apply("model", pods[first], [StoreBlocks(keys)])
        stored += CHAIN
        if rng.random() < 0.2 and stored < entries:
            await index.apply("model", pods[(first + 1) % len(pods)], [StoreBlocks(keys)])
            stored += CHAIN


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


async def time_lookups(index: MemoryIndex, chain: list[int], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await index.lookup("model", chain)
        samples.append((time.perf_counter() - start) * 1e6)
    return percentiles(samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args()
    pods = [PodRank(f"10.0.0.{i}:8000") for i in range(args.pods)]

    gc.collect()
    tracemalloc.start()
    index = MemoryIndex(ttl=3600, max_entries=args.entries * 2)
    await populate(index, pods, args.entries, seed=1)
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    entries = (await index.stats()).entries
    print(f"entries={entries} memory={traced / entries:.0f} B/entry (tracemalloc, index only)")

    rng = random.Random(2)
    chain = [rng.getrandbits(64) for _ in range(512)]
    # pod 0 holds the whole prompt, pod 1 its first 300 blocks, pod 2 the first 100 on CPU
    # plus scattered later blocks; the other pods hold none of it.
    await index.apply("model", pods[0], [StoreBlocks(chain)])
    await index.apply("model", pods[1], [StoreBlocks(chain[:300])])
    await index.apply("model", pods[2], [StoreBlocks(chain[:100] + chain[200:512:7])])
    gc.collect()
    gc.freeze()
    for name, keys in (
        ("512-key chain, 3 of 8 pods match", chain),
        ("512-key chain, no pod holds it", [rng.getrandbits(64) for _ in range(512)]),
    ):
        p50, p99 = await time_lookups(index, keys, args.runs)
        print(f"lookup {name}: p50={p50:.1f} us p99={p99:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
