"""Benchmark: lookups over 1M (block, pod) entries: the native index, and the native data
plane's lookup (keys, index, scores) as queries call it; and memory per entry.

Run: ``.venv/bin/python -m loadtest.bench_index [--entries 1000000] [--pods 8]``

Two measurements, each a 512-block prompt against 8 pods (3 of which hold some of it):
- ``NativeIndex.lookup`` (service/index/native.py): 512 keys, the index alone;
- ``NativeDataPlane.lookup``: the same through the data plane, once by 8192 token ids
  (``tokens`` key mode: the keys are computed, then looked up and scored) and once by 512
  engine block hashes (``vllm`` key mode), the paths the REST and gRPC queries take.
The planes are filled through ``ingest_frame`` with vLLM 0.33 wire bytes. Memory is the
growth of the process's resident set while the index fills, per entry (the table is native:
tracemalloc cannot see it), so it includes allocator slack.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from service.config import Settings
from service.dataplane.native import NativeDataPlane
from service.dataplane.protocol import Lookup
from service.events.model import Tier
from service.events.subscriber import Frame, Source
from service.index.keys import TOKEN_TYPECODE
from service.index.native import NativeIndex
from service.index.protocol import PodRank, StoreBlocks
from tests.support.vllm_wire import WireEvent, encode_batch, stored

CHAIN = 64
PROMPT_BLOCKS = 512
BLOCK_SIZE = 16
TOKENS_MODEL = "tokens-model"
VLLM_MODEL = "vllm-model"


def rss_bytes() -> int:
    """The resident set of this process (Linux), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def chains(entries: int, pods: int, seed: int) -> list[tuple[int, list[int]]]:
    """(pod, keys) of 64-block chains adding up to ``entries``; one chain in five is also
    held by a second pod."""
    rng = random.Random(seed)
    made: list[tuple[int, list[int]]] = []
    stored_entries = 0
    while stored_entries < entries:
        keys = [rng.getrandbits(64) for _ in range(CHAIN)]
        first = rng.randrange(pods)
        made.append((first, keys))
        stored_entries += CHAIN
        if rng.random() < 0.2 and stored_entries < entries:
            made.append(((first + 1) % pods, keys))
            stored_entries += CHAIN
    return made


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


async def time_calls(call: Callable[[], Awaitable[object]], runs: int) -> tuple[float, float]:
    """p50 and p99 of ``call``, in microseconds, after a warm-up."""
    for _ in range(min(runs, 200)):
        await call()
    samples = []
    clock = time.perf_counter
    for _ in range(runs):
        start = clock()
        await call()
        samples.append((clock() - start) * 1e6)
    return percentiles(samples)


def report(name: str, p50: float, p99: float) -> None:
    print(f"  {name}: p50={p50:.1f} us p99={p99:.1f} us")


# -- the index alone ------------------------------------------------------------------------


async def bench_index(args: argparse.Namespace, pods: Sequence[PodRank]) -> None:
    gc.collect()
    before = rss_bytes()
    index = NativeIndex(ttl=3600, max_entries=args.entries * 2)
    for pod, keys in chains(args.entries, len(pods), seed=1):
        await index.apply("model", pods[pod], [StoreBlocks(keys)])
    entries = (await index.stats()).entries
    grown = rss_bytes() - before
    print(f"NativeIndex: {entries:,} entries, {grown / entries:.0f} B/entry (RSS growth)")

    rng = random.Random(2)
    prompt = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]
    # pod 0 holds the whole prompt, pod 1 its first 300 blocks, pod 2 the first 100 on CPU
    # plus scattered later blocks; the other pods hold none of it.
    await index.apply("model", pods[0], [StoreBlocks(prompt)])
    await index.apply("model", pods[1], [StoreBlocks(prompt[:300])])
    await index.apply("model", pods[2], [StoreBlocks(prompt[:100] + prompt[200:512:7], Tier.CPU)])
    found = await index.lookup("model", prompt)
    assert sorted(m.match_length for m in found) == [100, 300, 512], found
    unheld = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]

    async def held() -> object:
        return await index.lookup("model", prompt)

    async def not_held() -> object:
        return await index.lookup("model", unheld)

    report(
        f"{PROMPT_BLOCKS}-key chain, 3 of {len(pods)} pods match",
        *await time_calls(held, args.runs),
    )
    report(f"{PROMPT_BLOCKS}-key chain, no pod holds it", *await time_calls(not_held, args.runs))


# -- the data plane -------------------------------------------------------------------------


def frame(pod: PodRank, seq: int, payload: bytes, model: str) -> Frame:
    topic = f"kv@{pod.pod_id}@{model}".encode()
    return Frame(Source(rank=pod.dp_rank), topic, seq, payload, time.time())


async def bench_plane(args: argparse.Namespace, pods: Sequence[PodRank]) -> None:
    settings = Settings.model_validate(
        {
            "zmq": {"endpoint": ""},
            "index": {"max_size": args.entries * 2},
            "models": [{"name": VLLM_MODEL, "key_mode": "vllm"}],
        }
    )
    plane = NativeDataPlane(settings, None)
    # An engine serves one model: the tokens-mode model's pods are others, in the same table.
    token_pods = [PodRank(f"10.0.1.{i}:8000") for i in range(len(pods))]
    seqs: dict[PodRank, int] = {}

    async def send(pod: PodRank, model: str, *events: WireEvent) -> None:
        seq = seqs.get(pod, 0)
        payload = encode_batch(list(events), version="0.33")
        await plane.ingest_frame(frame(pod, seq, payload, model))
        seqs[pod] = seq + 1

    try:
        # Bulk entries: hashes without tokens (an offload's shape) store as they are in vllm
        # key mode, so filling 1M entries costs no hashing; 4 chains per batch.
        filler = chains(args.entries, len(pods), seed=1)
        for start in range(0, len(filler), 4):
            for holder, keys in filler[start : start + 4]:
                await send(pods[holder], VLLM_MODEL, stored(keys, (), block_size=0, medium="GPU"))
        rng = random.Random(2)
        token_ids = [rng.randrange(150_000) for _ in range(PROMPT_BLOCKS * BLOCK_SIZE)]
        hashes = [rng.getrandbits(64) for _ in range(PROMPT_BLOCKS)]
        # The same holders as above, in both key modes: the first pod all of the prompt, the
        # second its first 300 blocks, the third the first 100 (on CPU).
        for rank, (blocks, medium) in enumerate(((512, None), (300, None), (100, "CPU"))):
            tokens = token_ids[: blocks * BLOCK_SIZE]
            await send(
                token_pods[rank], TOKENS_MODEL, stored(hashes[:blocks], tokens, medium=medium)
            )
            offload = stored(hashes[:blocks], (), block_size=0, medium=medium or "GPU")
            await send(pods[rank], VLLM_MODEL, offload)
        print(f"NativeDataPlane: {plane.counts().entries:,} entries")
        packed = array(TOKEN_TYPECODE, token_ids)

        async def by_tokens() -> Lookup:
            return await plane.lookup(TOKENS_MODEL, token_ids=packed)

        async def by_hashes() -> Lookup:
            return await plane.lookup(VLLM_MODEL, block_hashes=hashes)

        for lookup in (by_tokens, by_hashes):
            answer = await lookup()
            assert [p.match_length for p in answer.pods] == [512, 300, 100], answer
        matching = f"3 of {len(pods)} pods match"
        report(
            f"lookup by {len(token_ids)} token ids (tokens mode), {matching}",
            *await time_calls(by_tokens, args.runs),
        )
        report(
            f"lookup by {PROMPT_BLOCKS} block hashes (vllm mode), {matching}",
            *await time_calls(by_hashes, args.runs),
        )
    finally:
        await plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.pods < 3:
        parser.error("--pods must be at least 3")
    pods = [PodRank(f"10.0.0.{i}:8000") for i in range(args.pods)]
    asyncio.run(bench_index(args, pods))
    gc.collect()
    asyncio.run(bench_plane(args, pods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
