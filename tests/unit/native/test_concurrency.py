"""Reads racing writes: lookups from several threads while another thread writes, as the
native plane runs them (a shared lock, the GIL released, both cores). Every answer seen
mid-race must be well formed, and once the writer is done the index must hold exactly what
the same writes, applied alone, give the reference."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import zmq

from service import _dataplane
from service.events.model import Tier
from service.index.protocol import ClearPod, PodRank, RemoveBlocks, StoreBlocks
from service.index.reference import ReferenceIndex
from tests.support.planes import make_plane, settings_for_tests
from tests.support.vllm_wire import encode_batch, stored

MODEL = "m"
PODS = [PodRank(f"pod-{i}", i % 2) for i in range(4)]
CHAINS = [[c << 20 | i for i in range(64)] for c in range(6)]
TTL = 3600.0
CAPACITY = 600


def check_well_formed(answer: list[tuple[str, int, int, int, dict[int, int]]], size: int) -> None:
    for _pod, _rank, match_length, block_count, tier_sets in answer:
        assert 0 <= match_length <= block_count <= size
        assert sum(tier_sets.values()) == match_length


def race(lookups: list[Callable[[], None]], write: Callable[[], None], seconds: float) -> int:
    """Runs ``write`` once on a thread while the lookups loop on others; returns lookups."""
    done = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * len(lookups)

    def reader(index: int) -> None:
        try:
            while not done.is_set():
                lookups[index]()
                counts[index] += 1
        except BaseException as error:  # reported on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(lookups))]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + seconds
        write()
        while time.monotonic() < deadline and not errors:
            time.sleep(0.01)  # let the readers run on a while after the last write
    finally:
        done.set()
        for thread in threads:
            thread.join(10)
    if errors:
        raise errors[0]
    return sum(counts)


def test_the_index_answers_well_formed_while_written_and_ends_as_the_reference() -> None:
    rng = random.Random(5)
    ops = []
    for _ in range(3000):
        pod = rng.choice(PODS)
        chain = rng.choice(CHAINS)
        start = rng.randrange(len(chain))
        keys = chain[start : start + rng.randrange(1, 16)]
        kind = rng.choices(["store", "remove", "clear"], weights=[6, 3, 1])[0]
        ops.append((kind, pod, keys, rng.choice(list(Tier))))
    native = _dataplane.BlockIndex(TTL, CAPACITY)

    def write() -> None:
        for kind, pod, keys, tier in ops:
            if kind == "store":
                native.store(MODEL, pod.pod_id, pod.dp_rank, keys, tier, 0.0)
            elif kind == "remove":
                native.remove(MODEL, pod.pod_id, pod.dp_rank, keys, tier, 0.0)
            else:
                native.clear(MODEL, pod.pod_id, pod.dp_rank)
            native.enforce_capacity()

    def lookup(chain: list[int]) -> Callable[[], None]:
        return lambda: check_well_formed(native.lookup(MODEL, chain, 0.0), len(chain))

    seen = race([lookup(CHAINS[0]), lookup(CHAINS[1])], write, 0.3)
    assert seen > 100  # the readers did run alongside

    reference = ReferenceIndex(ttl=TTL, max_entries=CAPACITY, clock=lambda: 0.0)

    async def replay() -> None:
        for kind, pod, keys, tier in ops:
            if kind == "store":
                await reference.apply(MODEL, pod, [StoreBlocks(keys, tier)])
            elif kind == "remove":
                await reference.apply(MODEL, pod, [RemoveBlocks(keys, tier)])
            else:
                await reference.apply(MODEL, pod, [ClearPod()])
        for chain in CHAINS:
            expected = [
                (m.pod.pod_id, m.pod.dp_rank, m.match_length, m.block_count, dict(m.prefix_tiers))
                for m in await reference.lookup(MODEL, chain)
            ]
            assert native.lookup(MODEL, chain, 0.0) == expected
        stats = await reference.stats()
        assert native.stats()["entries"] == stats.entries
        assert native.stats()["evictions"] == dict(stats.evictions)

    asyncio.run(replay())


def test_the_plane_answers_while_its_own_threads_ingest() -> None:
    """The running native plane: frames over a real socket, applied by its applier thread,
    while lookups run on two Python threads (GIL released) against the same table."""
    tokens = [7 * i % 50_000 for i in range(16 * 256)]  # one prompt of 256 blocks

    async def scenario() -> None:
        plane = make_plane("native", settings_for_tests())
        (endpoint,) = plane.bind("tcp://127.0.0.1:0", 1)
        await plane.start()
        context = zmq.Context()
        pub = context.socket(zmq.PUB)
        pub.connect(endpoint)
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        answers: list[tuple[int, int]] = []

        def lookup() -> None:
            found = asyncio.run(plane.lookup(MODEL, token_ids=tokens))
            for pod in found.pods:
                assert 0 <= pod.match_length <= pod.block_count <= found.total_blocks
                answers.append((pod.match_length, pod.block_count))

        def publish() -> None:
            for pod in range(4):
                for event in range(16):  # 16 events of 16 blocks continue the chain
                    first = event * 16
                    hashes = [pod << 32 | (first + j) for j in range(16)]
                    parent = None if event == 0 else pod << 32 | (first - 1)
                    payload = encode_batch(
                        [stored(hashes, tokens[first * 16 : (first + 16) * 16], parent=parent)],
                        version="0.33",
                    )
                    topic = f"kv@10.0.5.{pod}:8000@{MODEL}".encode()
                    pub.send_multipart([topic, event.to_bytes(8, "big"), payload])

        try:
            await asyncio.to_thread(race, [lookup, lookup], publish, 1.0)
            deadline = time.monotonic() + 10
            while True:
                found = await plane.lookup(MODEL, token_ids=tokens)
                if [p.match_length for p in found.pods] == [256] * 4:
                    break
                assert time.monotonic() < deadline, found
                await asyncio.sleep(0.02)
            assert answers, "no lookup ran during ingest"
        finally:
            pub.close(linger=0)
            context.term()
            await plane.stop()

    asyncio.run(scenario())
