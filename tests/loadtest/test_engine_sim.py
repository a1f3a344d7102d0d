"""The simulated engine's cache behaves like vLLM's prefix cache, and says so on the wire."""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq
import zmq.asyncio

from loadtest.sim.cache import BlocksRemoved, BlocksStored, PrefixCache
from loadtest.sim.chain import BlockChain
from loadtest.sim.engine import Request, ServiceTime, SimEngine
from loadtest.sim.publisher import END_SEQ, EventPublisher
from service.events.model import BlockRemoved, BlockStored, Tier
from service.events.vllm import decode_batch
from service.index.keys import VllmKeys
from tests.support.vllm_wire import Version, encode_batch

BLOCK = 16


def chain_of(tokens: list[int]) -> BlockChain:
    chain = BlockChain(BLOCK)
    chain.extend(tokens)
    return chain


def hashes(blocks: int, base: int) -> list[int]:
    return [base + i for i in range(blocks)]


# --- block hashes ----------------------------------------------------------------------


def test_chain_reproduces_the_contract_vector() -> None:
    # CONTRACT.md section 2: vLLM >= 0.29, no PYTHONHASHSEED, sha256 over pickle.
    assert chain_of(list(range(1000, 1040))).hashes == [
        7322446309363477352,
        17027874615116373601,
    ]


def test_chain_hashes_equal_vllm_keys_however_it_grows() -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(150_000) for _ in range(1000)]
    expected = VllmKeys().block_keys(tokens, BLOCK)
    assert len(expected) == 1000 // BLOCK

    grown = BlockChain(BLOCK)
    cuts = sorted(rng.sample(range(1, 1000), 20))
    for start, end in zip([0, *cuts], [*cuts, 1000], strict=True):
        grown.extend(tokens[start:end])
    assert grown.hashes == expected

    base = chain_of(tokens[:333])
    forked = base.fork()
    forked.extend(tokens[333:])
    assert forked.hashes == expected
    assert base.hashes == expected[: 333 // BLOCK]  # the fork left its origin alone


# --- the cache -------------------------------------------------------------------------


def test_a_repeated_prefix_hits_except_the_last_token() -> None:
    cache = PrefixCache(16)
    prompt = hashes(4, 100)
    first = cache.allocate(prompt, 5)
    assert first is not None and first.hit_blocks == 0
    cache.free(first)
    # A prompt of exactly 4 full blocks: vLLM recomputes its last token, so 3 blocks hit.
    again = cache.allocate(prompt, 5, max_hit=3)
    assert again is not None and again.hit_blocks == 3
    # A longer prompt with the same first 4 blocks hits all 4.
    longer = cache.allocate([*prompt, 200, 201], 7)
    assert longer is not None and longer.hit_blocks == 4
    # A prompt that differs in its first block shares nothing (the hash is chained).
    other = cache.allocate([999, *prompt[1:]], 4)
    assert other is not None and other.hit_blocks == 0


def test_lru_evicts_the_least_recently_used_unreferenced_blocks_tail_first() -> None:
    cache = PrefixCache(6)
    a, b, c = hashes(2, 100), hashes(2, 200), hashes(2, 300)
    for prompt in (a, b, c):
        allocation = cache.allocate(prompt, 2)
        assert allocation is not None
        cache.free(allocation)
    # a is used again: now b is the least recently used.
    touched = cache.allocate(a, 2)
    assert touched is not None and touched.hit_blocks == 2
    cache.free(touched)
    cache.take_events()

    d = cache.allocate(hashes(2, 400), 2)
    assert d is not None
    assert cache.take_events()[:2] == [BlocksRemoved((b[1],)), BlocksRemoved((b[0],))]
    assert cache.cached_hashes() == {*a, *c, *hashes(2, 400)}
    assert cache.evictions == 2


def test_referenced_blocks_are_never_evicted() -> None:
    cache = PrefixCache(4)
    running = cache.allocate(hashes(2, 100), 2)
    idle = cache.allocate(hashes(2, 200), 2)
    assert running is not None and idle is not None
    cache.free(idle)

    # Two blocks are free (holding idle's hashes): a 3-block request must wait...
    assert cache.allocate(hashes(3, 300), 3) is None
    assert cache.cached_hashes() == {*hashes(2, 100), *hashes(2, 200)}
    # ...a 2-block one evicts idle's blocks, never the running request's.
    taken = cache.allocate(hashes(2, 300), 2)
    assert taken is not None
    assert cache.cached_hashes() == {*hashes(2, 100), *hashes(2, 300)}
    assert cache.ref_count(100) == 1
    # Sharing a running request's prefix references it twice; freeing one keeps it held.
    shared = cache.allocate([100, 101, 500], 3, max_hit=2)
    assert shared is None  # no free block left for block 500
    cache.free(taken)
    shared = cache.allocate([100, 101, 500], 3, max_hit=2)
    assert shared is not None and shared.hit_blocks == 2
    assert cache.ref_count(100) == 2
    cache.free(running)
    assert cache.ref_count(100) == 1 and 100 in cache


def test_stored_events_carry_the_parent_and_skip_duplicates() -> None:
    cache = PrefixCache(8)
    first = cache.allocate([1, 2], 2)
    assert first is not None
    # Block 1 of this prompt is a miss (5 != 1), block 2's hash is already cached (2):
    # it is computed, not cached twice.
    second = cache.allocate([5, 2, 7], 3)
    assert second is not None
    assert cache.take_events() == [
        BlocksStored((1, 2), None, 0),
        BlocksStored((5,), None, 0),
        BlocksStored((7,), 2, 2),
    ]


# --- the engine: service time, queue, and its events on the wire ------------------------


def request_for(chain: BlockChain, prompt_len: int, output_len: int) -> Request:
    return Request(chain, prompt_len, output_len, arrival=0.0)


def test_prefill_time_counts_only_uncached_tokens_and_the_queue_is_fifo() -> None:
    timing = ServiceTime(prefill_overhead=0.01, prefill_per_token=0.001, decode_per_token=0.1)
    engine = SimEngine(0, "pod", capacity_blocks=64, timing=timing)
    rng = random.Random(1)
    chain = chain_of([rng.randrange(1000) for _ in range(200)])
    first, second = request_for(chain, 100, 10), request_for(chain, 150, 10)
    engine.enqueue(first)
    engine.enqueue(second)
    assert engine.start_next(0.0) is first
    assert engine.start_next(0.0) is None  # one prefill at a time
    assert first.first_token == pytest.approx(0.01 + 0.001 * 100)
    decode_end = engine.prefill_done(first)
    assert decode_end == pytest.approx(first.first_token + 1.0)
    assert engine.start_next(first.first_token) is second
    # 96 tokens (6 full blocks) of the second prompt were cached by the first.
    assert second.cached_tokens == 96
    assert second.first_token == pytest.approx(first.first_token + 0.01 + 0.001 * 54)


@pytest.mark.parametrize("version", ["0.33", "0.23"])
def test_published_events_decode_to_exactly_the_cache_changes(version: Version) -> None:
    rng = random.Random(3)
    engine = SimEngine(0, "pod", capacity_blocks=40, timing=ServiceTime(), publish=True)
    shared = chain_of([rng.randrange(150_000) for _ in range(160)])
    held: set[int] = set()
    removed_total = 0
    for number in range(12):
        chain = shared.fork() if number % 2 else BlockChain(BLOCK)
        chain.extend(rng.randrange(150_000) for _ in range(rng.randrange(40, 300)))
        prompt_len = len(chain) - 20
        request = request_for(chain, prompt_len, 20)
        engine.enqueue(request)
        assert engine.start_next(0.0) is request
        steps = [engine.take_events()]
        engine.prefill_done(request)
        engine.finish(request, 1.0)
        steps.append(engine.take_events())
        for events in steps:
            batch = decode_batch(encode_batch(events, version=version))
            assert not batch.skipped
            for event in batch.events:
                if isinstance(event, BlockStored):
                    assert event.tier is Tier.GPU and event.block_size == BLOCK
                    assert held.isdisjoint(event.block_hashes)
                    # The tokens are the blocks' own, and the parent is the chain's.
                    first = chain.hashes.index(event.block_hashes[0])
                    count = len(event.block_hashes)
                    assert list(event.block_hashes) == chain.hashes[first : first + count]
                    assert list(event.token_ids) == chain.block_tokens(first, count)
                    parent = chain.hashes[first - 1] if first else None
                    assert event.parent_block_hash == parent
                    held.update(event.block_hashes)
                else:
                    assert isinstance(event, BlockRemoved)
                    assert event.tier is Tier.GPU
                    assert held.issuperset(event.block_hashes)
                    held.difference_update(event.block_hashes)
                    removed_total += len(event.block_hashes)
        # What the events say the engine holds is what it holds.
        assert held == engine.cache.cached_hashes()
    assert removed_total == engine.cache.evictions > 0


def test_publisher_sends_sequenced_frames_and_replays_them() -> None:
    async def scenario() -> None:
        context = zmq.asyncio.Context()
        publisher = EventPublisher(context, "10.0.0.9:8000", version="0.33")
        publisher.start()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(publisher.endpoint)
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(publisher.replay_endpoint)
        try:
            async with asyncio.timeout(5.0):
                await publisher.wait_subscribed()
            engine = SimEngine(0, "p", capacity_blocks=8, timing=ServiceTime(), publish=True)
            chain = chain_of(list(range(64)))
            request = request_for(chain, 48, 8)
            engine.enqueue(request)
            engine.start_next(0.0)
            events = engine.take_events()
            assert await publisher.publish("m/one", events) == 0
            assert await publisher.publish("m/two", events) == 1

            frames = [await asyncio.wait_for(sub.recv_multipart(), 5.0) for _ in range(2)]
            assert [f[0] for f in frames] == [b"kv@10.0.0.9:8000@m/one", b"kv@10.0.0.9:8000@m/two"]
            assert [int.from_bytes(f[1], "big") for f in frames] == [0, 1]
            stored_event = decode_batch(frames[0][2]).events[0]
            assert isinstance(stored_event, BlockStored)
            assert list(stored_event.block_hashes) == chain.hashes[:3]

            await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
            replayed = [await asyncio.wait_for(dealer.recv_multipart(), 5.0) for _ in range(2)]
            assert replayed[0] == [b"", frames[1][0], frames[1][1], frames[1][2]]
            assert replayed[1][2:] == [END_SEQ, b""]
            assert publisher.replays == 1
        finally:
            sub.close(linger=0)
            dealer.close(linger=0)
            await publisher.close()
            context.term()

    asyncio.run(scenario())
