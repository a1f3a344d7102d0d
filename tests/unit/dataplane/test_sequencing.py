"""What a data plane does with the frames it receives, held alike for both planes.

Identity (topic or socket), per (pod, rank) sequencing without a replay endpoint (first
contact, gaps, restarts), model changes, forgotten pods, decode errors and bad events, and
the copies semantics, end to end from wire bytes to answers. Frames go in through
``ingest_frame``; everything is asserted through what a user sees: lookups, ``/v1/pods``
(``pods()``), ``/v1/models``, counts and metrics. Replays need a real ROUTER socket: the
daemon's end-to-end tests (tests/e2e) cover them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from service.dataplane.protocol import DataPlane, DataPlaneKind
from service.dataplane.python import parse_topic
from service.events.subscriber import Frame, Source
from service.status import PodStatus
from service.telemetry import Metrics
from tests.support.planes import Feeder, make_plane
from tests.support.vllm_wire import (
    RawEvent,
    WireEvent,
    cleared,
    encode_batch,
    pack,
    raw,
    removed,
    stored,
)

POD = "10.0.0.9:8000"
MODEL = "m"
TOPIC = f"kv@{POD}@{MODEL}".encode()


def tokens(block: int) -> list[int]:
    """The 16 token ids of a one-block prompt of its own."""
    return list(range(16 * block, 16 * block + 16))


def one_block(block: int) -> WireEvent:
    """A one-block prompt of its own, its engine hash the block number."""
    return stored([block], tokens(block))


def frame(
    seq: int,
    *events: WireEvent | RawEvent,
    topic: bytes = TOPIC,
    source: Source | None = None,
    received: float | None = None,
    dp_rank: int | None = 0,
) -> Frame:
    payload = encode_batch(list(events), ts=time.time(), version="0.33", dp_rank=dp_rank)
    when = time.time() if received is None else received
    return Frame(source or Source(), topic, seq, payload, when)


def run(kind: DataPlaneKind, scenario: Callable[[DataPlane], Awaitable[None]]) -> None:
    """``scenario`` against a fresh plane of ``kind`` (no sockets), stopped afterwards."""

    async def main() -> None:
        plane = make_plane(kind)
        try:
            await scenario(plane)
        finally:
            await plane.stop()

    asyncio.run(main())


async def holders(plane: DataPlane, token_ids: Sequence[int], model: str = MODEL) -> list[str]:
    """Pod labels holding the prompt's first block, as ``/v1/score`` names them."""
    found = await plane.lookup(model, token_ids=token_ids)
    return [str(p.pod) for p in found.pods if p.match_length]


async def stream(plane: DataPlane, pod: str = POD) -> PodStatus:
    (status,) = [p for p in await plane.pods() if p.pod_id == pod]
    return status


def drops(plane: DataPlane) -> dict[str, int]:
    return {reason: n for reason, n in plane.counts().drops.items() if n}


def test_topic_parsing() -> None:
    assert parse_topic(b"kv@10.0.0.1:8000@Qwen/Qwen3-0.6B") == ("10.0.0.1:8000", "Qwen/Qwen3-0.6B")
    assert parse_topic(b"kv@10.0.0.1:8000@org/m@v2") == ("10.0.0.1:8000", "org/m@v2")
    assert parse_topic(b"kv@") == (None, None)
    assert parse_topic(b"") == (None, None)
    assert parse_topic(b"kv@pod") == ("pod", None)
    assert parse_topic(b"kv@pod@\xff") == (None, None)  # not UTF-8: names nobody


# -- identity -------------------------------------------------------------------------------


def test_identity_comes_from_the_topic_or_the_socket(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        # Bind mode: the topic names both.
        await plane.ingest_frame(frame(0, one_block(1), topic=b"kv@10.0.0.1:8000@m"))
        # Connect mode: the configured pod id wins over the topic's; the topic's model wins
        # over the pod entry's, which stands in when the topic names none.
        named = Source(pod_id="10.0.0.2:8000", model="entry-model")
        await plane.ingest_frame(frame(0, one_block(2), topic=b"kv@10.0.0.9:1@m", source=named))
        await plane.ingest_frame(
            frame(0, one_block(3), topic=b"kv@", source=Source("10.0.0.3:8000", "m2"))
        )
        pods = [(p.pod_id, p.model) for p in await plane.pods()]
        assert pods == [("10.0.0.1:8000", "m"), ("10.0.0.2:8000", "m"), ("10.0.0.3:8000", "m2")]
        assert await holders(plane, tokens(1)) == ["10.0.0.1:8000"]
        assert await holders(plane, tokens(2)) == ["10.0.0.2:8000"]
        assert await holders(plane, tokens(3), model="m2") == ["10.0.0.3:8000"]
        assert drops(plane) == {}

    run(kind, scenario)


def test_frames_that_name_no_pod_or_model_are_dropped_and_counted(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        for topic, source in [
            (b"kv@", None),
            (b"", None),
            (b"kv@10.0.0.1:8000", None),  # no model
            (b"kv@@m", None),  # no pod
            (b"kv@10.0.0.1:8000@\xff\xfe", None),  # not UTF-8
            (b"kv@\xff@m", Source(pod_id="10.0.0.2:8000")),  # not UTF-8, the socket's pod
        ]:
            await plane.ingest_frame(frame(0, one_block(1), topic=topic, source=source))
        assert drops(plane) == {"unidentified": 6}
        assert await plane.pods() == []
        assert (await plane.lookup(MODEL, token_ids=tokens(1))).pods == []
        # Named frames still apply.
        await plane.ingest_frame(frame(0, one_block(1)))
        assert await holders(plane, tokens(1)) == [POD]

    run(kind, scenario)


# -- sequencing (no replay endpoint) --------------------------------------------------------


def test_first_contact_without_a_replay_endpoint_applies_at_once(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        # An engine running for a while: its first frame seen is not seq 0.
        await plane.ingest_frame(frame(7, one_block(1), source=Source(replay_endpoint=None)))
        status = await stream(plane)
        assert (status.state, status.last_seq, status.batches, status.blocks) == ("live", 7, 1, 1)
        assert (status.gaps, status.lost_batches, status.replays) == (0, 0, 0)
        assert await holders(plane, tokens(1)) == [POD]

    run(kind, scenario)


def test_a_gap_without_a_replay_endpoint_counts_the_lost_batches(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        metrics = Metrics()
        metrics.watch(plane)
        for seq in (0, 1, 5):
            await plane.ingest_frame(frame(seq, one_block(10 + seq)))
        status = await stream(plane)
        assert (status.gaps, status.lost_batches, status.last_seq, status.blocks) == (1, 3, 5, 3)
        assert await holders(plane, tokens(15)) == [POD]  # the frame after the gap applies
        sample = metrics.registry.get_sample_value
        assert sample("kv_cache_sequence_gaps_total", {"pod": POD}) == 1
        assert sample("kv_cache_lost_batches_total", {"pod": POD}) == 3

    run(kind, scenario)


def test_an_engine_restart_clears_the_pod(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        for seq in range(3):
            await plane.ingest_frame(frame(seq, one_block(seq)))
        other = Feeder(plane, MODEL)  # another pod: untouched by this one's restart
        await other.send("10.0.0.8:8000", one_block(0))
        # seq back to 0: a new engine process, whose cache starts empty.
        await plane.ingest_frame(frame(0, one_block(9)))
        status = await stream(plane)
        assert (status.restarts, status.last_seq, status.blocks, status.gaps) == (1, 0, 1, 0)
        assert await holders(plane, tokens(0)) == ["10.0.0.8:8000"]
        assert await holders(plane, tokens(1)) == []
        assert await holders(plane, tokens(9)) == [POD]

    run(kind, scenario)


def test_each_rank_is_a_stream_of_its_own_named_by_the_batch(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        # The batch's data_parallel_rank names the rank; the socket's (bind mode: port + r)
        # stands in when the batch has none.
        await plane.ingest_frame(frame(0, one_block(1), source=Source(rank=0), dp_rank=2))
        await plane.ingest_frame(frame(0, one_block(2), source=Source(rank=3), dp_rank=None))
        await plane.ingest_frame(frame(1, one_block(3), source=Source(rank=0), dp_rank=2))
        # Rank 0's seq 0 after rank 2's seq 1 is no restart: sequences are per rank.
        await plane.ingest_frame(frame(0, one_block(4), source=Source(rank=0), dp_rank=0))
        listed = [(p.dp_rank, p.last_seq, p.blocks, p.restarts) for p in await plane.pods()]
        assert listed == [(0, 0, 1, 0), (2, 1, 2, 0), (3, 0, 1, 0)]
        assert await holders(plane, tokens(1)) == [f"{POD}@dp2"]
        assert await holders(plane, tokens(2)) == [f"{POD}@dp3"]
        assert await holders(plane, tokens(4)) == [POD]

    run(kind, scenario)


def test_a_pod_that_changes_model_loses_what_it_held_for_the_old_one(
    kind: DataPlaneKind,
) -> None:
    async def scenario(plane: DataPlane) -> None:
        await plane.ingest_frame(frame(0, one_block(1)))
        await plane.ingest_frame(frame(1, one_block(2)))
        # The pod's IP is reused by an engine serving another model.
        await plane.ingest_frame(frame(2, one_block(3), topic=f"kv@{POD}@other".encode()))
        assert [(p.pod_id, p.model, p.blocks) for p in await plane.pods()] == [(POD, "other", 1)]
        assert await holders(plane, tokens(1)) == []
        assert await holders(plane, tokens(3), model="other") == [POD]
        blocks = {m.name: (m.blocks, m.pods) for m in await plane.models()}
        assert blocks == {MODEL: (0, 0), "other": (1, 1)}

    run(kind, scenario)


def test_frames_sent_before_a_pod_was_forgotten_do_not_bring_it_back(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        metrics = Metrics()
        metrics.watch(plane)
        await plane.ingest_frame(frame(0, one_block(1)))
        await plane.ingest_frame(frame(3, one_block(2)))  # a gap: a per-pod series
        sample = metrics.registry.get_sample_value
        assert sample("kv_cache_sequence_gaps_total", {"pod": POD}) == 1
        sent = time.time()
        await plane.forget_pod(POD)  # discovery saw the pod deleted
        assert await plane.pods() == []
        assert await holders(plane, tokens(1)) == []
        assert sample("kv_cache_sequence_gaps_total", {"pod": POD}) is None
        # A frame it sent before then, still in flight, is dropped, counted.
        await plane.ingest_frame(frame(4, one_block(3), received=sent - 0.5))
        assert drops(plane) == {"pod_dropped": 1}
        assert await plane.pods() == []
        assert await holders(plane, tokens(3)) == []
        # The pod comes back later: its new frames count again.
        await plane.ingest_frame(frame(0, one_block(4), received=time.time() + 1))
        assert [(p.pod_id, p.blocks) for p in await plane.pods()] == [(POD, 1)]
        assert await holders(plane, tokens(4)) == [POD]

    run(kind, scenario)


# -- bad input ------------------------------------------------------------------------------


def test_undecodable_frames_are_counted_by_reason_and_the_stream_goes_on(
    kind: DataPlaneKind,
) -> None:
    async def scenario(plane: DataPlane) -> None:
        await plane.ingest_frame(frame(0, one_block(1)))
        for seq, payload in ((1, b"\xc1 not msgpack"), (2, pack({"not": "a batch"}))):
            await plane.ingest_frame(Frame(Source(), TOPIC, seq, payload, time.time()))
        await plane.ingest_frame(frame(3, one_block(2)))
        assert drops(plane) == {"msgpack": 1, "batch_shape": 1}
        # Their sequence numbers still count: no gap, nothing lost.
        status = await stream(plane)
        assert (status.last_seq, status.gaps, status.lost_batches, status.blocks) == (3, 0, 0, 2)
        assert await holders(plane, tokens(2)) == [POD]

    run(kind, scenario)


def test_a_bad_event_is_skipped_alone_and_counted_by_reason(kind: DataPlaneKind) -> None:
    async def scenario(plane: DataPlane) -> None:
        bad: list[WireEvent | RawEvent] = [
            raw(["Bogus", 1]),  # unknown_type
            raw({"type": "FutureEvent", "x": 1}),  # unknown_type
            raw(["BlockStored", ["x"], None, tokens(5), 16, None, None]),  # bad_hash
            raw(["BlockStored"]),  # event_shape
            stored([6], tokens(6), medium="TAPE"),  # unknown_medium
            stored([7], tokens(7), parent=12345),  # unknown_parent: never seen
            removed([54321]),  # unmapped: never seen
        ]
        await plane.ingest_frame(frame(0, *bad[:4], one_block(1), *bad[4:], one_block(2)))
        assert drops(plane) == {
            "unknown_type": 2,
            "bad_hash": 1,
            "event_shape": 1,
            "unknown_medium": 1,
            "unknown_parent": 1,
            "unmapped": 1,
        }
        assert await holders(plane, tokens(1)) == [POD]
        assert await holders(plane, tokens(2)) == [POD]
        for block in (5, 6, 7):
            assert await holders(plane, tokens(block)) == []
        assert (await stream(plane)).blocks == 2

    run(kind, scenario)


# -- copies ---------------------------------------------------------------------------------


def test_a_block_stored_twice_stays_until_both_copies_are_removed(kind: DataPlaneKind) -> None:
    """vLLM does not de-duplicate blocks: two requests prefilling one prefix at once each
    cache a copy under the same hash, and each copy's eviction sends its own removal."""

    async def scenario(plane: DataPlane) -> None:
        feeder = Feeder(plane, MODEL)
        a, b = 0xA, 0xB
        prompt = tokens(1) + tokens(2)

        async def matched() -> int:
            found = (await plane.lookup(MODEL, token_ids=prompt)).pods
            return found[0].match_length if found else 0

        await feeder.send(POD, stored([a, b], prompt))
        await feeder.send(POD, stored([a, b], prompt))
        await feeder.send(POD, removed([b]))
        assert await matched() == 2  # one copy of b is left
        await feeder.send(POD, removed([b]))
        assert await matched() == 1
        # A copy on another tier is another copy: removing the GPU one leaves the CPU one.
        await feeder.send(POD, stored([a], medium="CPU", block_size=0))
        await feeder.send(POD, removed([a]), removed([a]))
        (pod,) = (await plane.lookup(MODEL, token_ids=prompt)).pods
        assert (pod.match_length, pod.tiers) == (1, {"cpu": 1})
        await feeder.send(POD, cleared())
        assert await matched() == 0
        assert (await stream(plane)).blocks == 0

    run(kind, scenario)
