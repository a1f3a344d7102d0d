"""Ingestor: ordering rules that need no sockets (the sockets are covered in tests/e2e)."""

from __future__ import annotations

import asyncio
import time

import pytest

from service import ingest
from service.events.subscriber import Frame, Source
from service.index.memory import MemoryIndex
from service.index.protocol import PodRank
from service.ingest import Ingestor, parse_topic
from service.models import ModelRegistry
from service.telemetry import Metrics
from tests.support.vllm_wire import encode_batch, stored

POD = "10.0.0.9:8000"
TOPIC = f"kv@{POD}@m".encode()


def make_ingestor(index: MemoryIndex, metrics: Metrics) -> Ingestor:
    return Ingestor(
        index,
        ModelRegistry(max_engine_hashes=1000),
        metrics,
        queue_size=10,
        replayer=None,
        replay_concurrency=1,
        replay_endpoint_for=lambda pod, rank: None,
        stale_after=60.0,
    )


def tokens(block: int) -> list[int]:
    return list(range(16 * block, 16 * block + 16))


def frame(seq: int, block: int, received: float) -> Frame:
    payload = encode_batch([stored([block], tokens(block))], version="0.33")
    return Frame(Source(), TOPIC, seq, payload, received)


def test_topic_parsing() -> None:
    assert parse_topic(b"kv@10.0.0.1:8000@Qwen/Qwen3-0.6B") == ("10.0.0.1:8000", "Qwen/Qwen3-0.6B")
    assert parse_topic(b"kv@10.0.0.1:8000@org/m@v2") == ("10.0.0.1:8000", "org/m@v2")
    assert parse_topic(b"kv@") == (None, None)
    assert parse_topic(b"") == (None, None)
    assert parse_topic(b"\xff@pod@") == ("pod", None)


def test_frames_queued_before_a_pod_was_forgotten_do_not_bring_it_back() -> None:
    async def main() -> None:
        index, metrics = MemoryIndex(), Metrics()
        ingestor = make_ingestor(index, metrics)
        sent = time.time()
        ingestor.submit(frame(0, 1, sent))
        ingestor.submit(frame(1, 2, sent))
        await ingestor.drain(seconds=1.0)
        assert (await index.stats()).entries == 2
        ingestor.submit(frame(2, 3, sent))  # queued, then the pod is deleted
        await ingestor.forget_pod(POD)
        await ingestor.drain(seconds=1.0)
        assert (await index.stats()).entries == 0
        assert await ingestor.pods() == []
        dropped = metrics.registry.get_sample_value(
            "kv_cache_event_decode_errors_total", {"reason": "pod_dropped"}
        )
        assert dropped == 1
        # The pod comes back later: its new frames count again.
        ingestor.submit(frame(0, 4, time.time() + 1))
        await ingestor.drain(seconds=1.0)
        assert [p.pod_id for p in await ingestor.pods()] == [POD]
        assert (await index.stats()).entries_by_pod == {("m", PodRank(POD)): 1}

    asyncio.run(main())


def test_gap_without_replay_counts_lost_batches_and_applies() -> None:
    async def main() -> None:
        index, metrics = MemoryIndex(), Metrics()
        ingestor = make_ingestor(index, metrics)
        now = time.time()
        for seq in (0, 1, 5):
            ingestor.submit(frame(seq, 10 + seq, now))
        await ingestor.drain(seconds=1.0)
        (status,) = await ingestor.pods()
        assert (status.gaps, status.lost_batches, status.last_seq) == (1, 3, 5)
        assert (await index.stats()).entries_by_pod[("m", PodRank(POD))] == 3

    asyncio.run(main())


def test_a_pod_that_switches_model_loses_its_old_models_entries() -> None:
    async def main() -> None:
        index, metrics = MemoryIndex(), Metrics()
        ingestor = make_ingestor(index, metrics)
        now = time.time()
        ingestor.submit(frame(0, 1, now))
        ingestor.submit(frame(1, 2, now))
        payload = encode_batch([stored([3], tokens(3))], version="0.33")
        ingestor.submit(Frame(Source(), f"kv@{POD}@other".encode(), 2, payload, now))
        await ingestor.drain(seconds=1.0)
        assert (await index.stats()).entries_by_pod == {("other", PodRank(POD)): 1}

    asyncio.run(main())


def test_forgetting_a_pod_drops_its_metric_series() -> None:
    async def main() -> None:
        index, metrics = MemoryIndex(), Metrics()
        ingestor = make_ingestor(index, metrics)
        ingestor.submit(frame(0, 1, time.time()))
        ingestor.submit(frame(3, 2, time.time()))  # a gap: a per-pod series appears
        await ingestor.drain(seconds=1.0)
        gaps = "kv_cache_sequence_gaps_total"
        assert metrics.registry.get_sample_value(gaps, {"pod": POD}) == 1
        assert metrics.registry.get_sample_value("kv_cache_event_lag_seconds", {"pod": POD})
        await ingestor.forget_pod(POD)
        assert metrics.registry.get_sample_value(gaps, {"pod": POD}) is None
        assert metrics.registry.get_sample_value("kv_cache_event_lag_seconds", {"pod": POD}) is None

    asyncio.run(main())


def big_frame(seq: int, events: int, received: float) -> Frame:
    """One batch of ``events`` one-block events, each starting its own prompt."""
    payload = encode_batch([stored([b], tokens(b)) for b in range(events)], version="0.33")
    return Frame(Source(), TOPIC, seq, payload, received)


def test_a_large_batch_lets_other_tasks_run_once_its_slice_is_used_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest, "_SLICE_SECONDS", 0.0)  # every step is past the slice

    async def main() -> None:
        index = MemoryIndex()
        ingestor = make_ingestor(index, Metrics())
        ingestor.submit(big_frame(0, 40, time.time()))
        seen: list[int] = []

        async def watch() -> None:  # a query's view of the index while the batch applies
            for _ in range(100):
                seen.append((await index.stats()).entries)
                await asyncio.sleep(0)

        await asyncio.gather(ingestor.drain(seconds=1.0), watch())
        assert (await index.stats()).entries == 40
        assert any(0 < entries < 40 for entries in seen), seen

    asyncio.run(main())


def test_a_pod_forgotten_while_its_batch_applies_gets_no_more_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest, "_SLICE_SECONDS", 0.0)

    async def main() -> None:
        index = MemoryIndex()
        ingestor = make_ingestor(index, Metrics())
        ingestor.submit(big_frame(0, 40, time.time()))
        applying = asyncio.create_task(ingestor.drain(seconds=1.0))
        for _ in range(1000):  # until the batch is partly applied
            if (await index.stats()).entries:
                break
            await asyncio.sleep(0)
        assert 0 < (await index.stats()).entries < 40
        await ingestor.forget_pod(POD)
        await applying
        assert (await index.stats()).entries == 0

    asyncio.run(main())
