"""Benchmark: ingest of pre-encoded vLLM batches into the index (decode + keys + apply).

Run: ``.venv/bin/python -m loadtest.bench_ingest [--blocks 1000000] [--key-mode tokens]``

Besides the rates it reports the slowest batches (p99.9, max, how many took over 2 ms):
the event loop runs nothing else meanwhile, so they are the stalls queries could meet.

Two shapes: events of 32 blocks (prefill of long prompts) and of 1 block (decode steps),
each event continuing its prompt's chain through ``parent_block_hash``, as vLLM sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import tracemalloc
from dataclasses import dataclass

from service.events.vllm import decode_batch
from service.index.keys import make_keyer
from service.index.memory import MemoryIndex
from service.index.protocol import PodRank
from service.index.translate import EventTranslator
from tests.support.vllm_wire import Version, WireEvent, encode_batch, stored

BLOCK_SIZE = 16
POD = PodRank("10.0.0.1:8000")


def make_batches(
    total_blocks: int, blocks_per_event: int, events_per_batch: int, version: Version, seed: int
) -> list[bytes]:
    """Prompts of 256 blocks, published ``blocks_per_event`` at a time."""
    rng = random.Random(seed)
    batches: list[bytes] = []
    pending: list[WireEvent] = []
    made = 0
    while made < total_blocks:
        parent = None
        for _ in range(256 // blocks_per_event):
            hashes = [rng.getrandbits(64) for _ in range(blocks_per_event)]
            tokens = [rng.randrange(150_000) for _ in range(blocks_per_event * BLOCK_SIZE)]
            pending.append(stored(hashes, tokens, block_size=BLOCK_SIZE, parent=parent))
            parent = hashes[-1]
            made += blocks_per_event
            if len(pending) == events_per_batch:
                batches.append(encode_batch(pending, version=version))
                pending = []
    if pending:
        batches.append(encode_batch(pending, version=version))
    return batches


STALL = 0.002  # a batch slower than this holds every query up noticeably


@dataclass
class Run:
    seconds: float
    events: int
    blocks: int
    batch_seconds: list[float]  # each batch's decode + translate + apply, in order

    def tail(self) -> str:
        """The slowest batches: where ingest would hold the event loop up."""
        ordered = sorted(self.batch_seconds)
        over = sum(s > STALL for s in ordered)
        return (
            f"per batch p50 {ordered[len(ordered) // 2] * 1e6:,.0f} us,"
            f" p99.9 {ordered[int(len(ordered) * 0.999)] * 1e6:,.0f} us,"
            f" max {ordered[-1] * 1e3:.1f} ms, {over} over {STALL * 1e3:g} ms"
        )


async def ingest(batches: list[bytes], key_mode: str, capacity: int) -> Run:
    index = MemoryIndex(max_entries=capacity)
    translator = EventTranslator(make_keyer(key_mode, "sha256", "0"), max_engine_hashes=capacity)
    events = 0
    clock = time.perf_counter
    batch_seconds = []
    start = clock()
    for payload in batches:
        began = clock()
        batch = decode_batch(payload)
        translation = translator.translate(batch.events)
        await index.apply("model", POD, translation.ops)
        batch_seconds.append(clock() - began)
        events += len(batch.events)
    elapsed = clock() - start
    blocks = (await index.stats()).entries
    return Run(elapsed, events, blocks, batch_seconds)


async def memory_per_entry(batches: list[bytes], capacity: int) -> tuple[int, float]:
    """Bytes held by the index plus the translator's engine-hash map, per indexed entry."""
    gc.collect()
    tracemalloc.start()
    index = MemoryIndex(max_entries=capacity)
    translator = EventTranslator(make_keyer("tokens"), max_engine_hashes=capacity)
    for payload in batches:
        await index.apply("model", POD, translator.translate(decode_batch(payload).events).ops)
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    entries = (await index.stats()).entries
    return entries, traced / entries


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--key-mode", choices=["tokens", "vllm"], default="tokens")
    parser.add_argument("--version", default="0.33", choices=["0.23", "0.33"])
    parser.add_argument(
        "--memory", action="store_true", help="also measure bytes per entry (tracemalloc)"
    )
    args = parser.parse_args()
    for blocks_per_event, events_per_batch in ((32, 4), (1, 32)):
        total = args.blocks if blocks_per_event > 1 else args.blocks // 4
        batches = make_batches(total, blocks_per_event, events_per_batch, args.version, seed=1)
        run = await ingest(batches, args.key_mode, capacity=total * 2)
        print(
            f"{args.key_mode} mode, vLLM {args.version} wire, {blocks_per_event} block(s)/event,"
            f" {events_per_batch} events/batch: {run.events / run.seconds:,.0f} events/s,"
            f" {run.blocks / run.seconds:,.0f} blocks/s ({run.blocks:,} blocks in"
            f" {run.seconds:.2f} s); {run.tail()}"
        )
    if args.memory:
        batches = make_batches(args.blocks, 32, 4, args.version, seed=2)
        entries, per_entry = await memory_per_entry(batches, capacity=args.blocks * 2)
        print(f"memory: {per_entry:.0f} B per entry, index + engine-hash map ({entries:,} entries)")


if __name__ == "__main__":
    asyncio.run(main())
