"""Benchmark: ingest of pre-encoded vLLM 0.33 batches by a data plane, in process (decode,
sequence, keys, index).

Run: ``.venv/bin/python -m loadtest.bench_ingest [--blocks 1000000] [--key-mode tokens]
[--plane native|python] [--memory]``

Each batch goes through ``DataPlane.ingest_frame``: for the native plane (the default) that
is the same code its applier thread runs on received frames, called from here one frame at a
time (so the figures leave out ZeroMQ and the hand-over between threads); ``--plane python``
times the Python reference. Besides the rates it reports the slowest batches (p99.9, max,
how many took over 2 ms): in the Python plane the event loop runs nothing else meanwhile, so
they are the stalls queries could meet; in the native one they hold the index's write lock.

Two shapes: events of 32 blocks (prefill of long prompts) and of 1 block (decode steps),
each event continuing its prompt's chain through ``parent_block_hash``, as vLLM sends them.
``--memory`` also reports the growth of the resident set per indexed entry (index and
engine-hash map, with allocator slack).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from service.config import Settings
from service.dataplane.protocol import DataPlane, DataPlaneKind
from service.events.subscriber import Frame, Source
from tests.support.planes import make_plane
from tests.support.vllm_wire import WireEvent, encode_batch, stored

BLOCK_SIZE = 16
POD = "10.0.0.1:8000"
MODEL = "model"
TOPIC = f"kv@{POD}@{MODEL}".encode()


def make_batches(
    total_blocks: int, blocks_per_event: int, events_per_batch: int, seed: int
) -> list[bytes]:
    """Prompts of 256 blocks, published ``blocks_per_event`` at a time, as vLLM 0.33 does."""
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
                batches.append(encode_batch(pending, version="0.33"))
                pending = []
    if pending:
        batches.append(encode_batch(pending, version="0.33"))
    return batches


STALL = 0.002  # a batch slower than this holds every query up noticeably


@dataclass
class Run:
    seconds: float
    events: int
    blocks: int
    batch_seconds: list[float]  # each batch's ingest_frame, in order

    def tail(self) -> str:
        """The slowest batches: where ingest would hold queries up."""
        ordered = sorted(self.batch_seconds)
        over = sum(s > STALL for s in ordered)
        return (
            f"per batch p50 {ordered[len(ordered) // 2] * 1e6:,.0f} us,"
            f" p99.9 {ordered[int(len(ordered) * 0.999)] * 1e6:,.0f} us,"
            f" max {ordered[-1] * 1e3:.1f} ms, {over} over {STALL * 1e3:g} ms"
        )


def settings_for(key_mode: str, capacity: int) -> Settings:
    models = [{"name": MODEL, "key_mode": key_mode, "hash_algorithm": "sha256", "hash_seed": "0"}]
    return Settings.model_validate(
        {"zmq": {"endpoint": ""}, "index": {"max_size": capacity}, "models": models}
    )


def frames(batches: list[bytes]) -> list[Frame]:
    """One engine's frames, numbered from 0; made before timing, as a receiver makes them."""
    now = time.time()
    return [Frame(Source(), TOPIC, seq, payload, now) for seq, payload in enumerate(batches)]


async def indexed(plane: DataPlane) -> int:
    """Entries the plane's index holds now (read through ``/v1/models``' figures)."""
    return sum(model.blocks for model in await plane.models())


async def ingest(kind: DataPlaneKind, batches: list[bytes], key_mode: str, capacity: int) -> Run:
    plane = make_plane(kind, settings_for(key_mode, capacity))
    try:
        to_send = frames(batches)
        clock = time.perf_counter
        batch_seconds = []
        gc.collect()
        start = clock()
        for frame in to_send:
            began = clock()
            await plane.ingest_frame(frame)
            batch_seconds.append(clock() - began)
        elapsed = clock() - start
        counts = plane.counts()
        assert not any(counts.drops.values()), counts.drops
        events = sum(counts.events.values())
        return Run(elapsed, events, await indexed(plane), batch_seconds)
    finally:
        await plane.stop()


def rss_bytes() -> int:
    """The resident set of this process (Linux), in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


async def memory_per_entry(
    kind: DataPlaneKind, batches: list[bytes], capacity: int
) -> tuple[int, float]:
    """Resident-set growth per indexed entry: the index and the engine-hash map."""
    to_send = frames(batches)
    gc.collect()
    before = rss_bytes()
    plane = make_plane(kind, settings_for("tokens", capacity))
    try:
        for frame in to_send:
            await plane.ingest_frame(frame)
        gc.collect()
        entries = await indexed(plane)
        return entries, (rss_bytes() - before) / entries
    finally:
        await plane.stop()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--key-mode", choices=["tokens", "vllm"], default="tokens")
    parser.add_argument("--plane", choices=["native", "python"], default="native")
    parser.add_argument(
        "--memory", action="store_true", help="also measure bytes per entry (resident set)"
    )
    args = parser.parse_args(argv)
    kind = cast(DataPlaneKind, args.plane)
    for blocks_per_event, events_per_batch in ((32, 4), (1, 32)):
        total = args.blocks if blocks_per_event > 1 else args.blocks // 4
        batches = make_batches(total, blocks_per_event, events_per_batch, seed=1)
        run = await ingest(kind, batches, args.key_mode, capacity=total * 2)
        print(
            f"{kind} plane, {args.key_mode} mode, vLLM 0.33 wire,"
            f" {blocks_per_event} block(s)/event, {events_per_batch} events/batch:"
            f" {run.events / run.seconds:,.0f} events/s,"
            f" {run.blocks / run.seconds:,.0f} blocks/s ({run.blocks:,} blocks in"
            f" {run.seconds:.2f} s); {run.tail()}"
        )
    if args.memory:
        batches = make_batches(args.blocks, 32, 4, seed=2)
        entries, per_entry = await memory_per_entry(kind, batches, capacity=args.blocks * 2)
        print(
            f"memory: {per_entry:.0f} B per entry, index + engine-hash map, resident set"
            f" ({entries:,} entries)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
