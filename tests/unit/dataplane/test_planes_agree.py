"""The native data plane against the Python reference, frame for frame.

Random streams of vLLM frames (stores continuing chains, offloads, removals of single
copies, clears, gaps, engine restarts, duplicates, undecodable payloads, unnamed senders,
several pods, DP ranks from the socket or the batch, a tokens-mode and a vllm-mode model,
capacity pressure and time passing) go to both planes through ``ingest_frame``; after
every frame both must answer every lookup alike, and count, list and warn alike.

Index semantics on their own (TTL, capacity order, copies) are held to the reference in
tests/conformance; this holds everything in front of the index too: decoding, identity,
sequencing and keying.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from service.dataplane.native import NativeDataPlane
from service.dataplane.protocol import DataPlane
from service.events.subscriber import Frame, Source
from service.index.keys import VllmKeys
from service.index.reference import ReferenceIndex
from tests.support.planes import make_plane, settings_for_tests
from tests.support.vllm_wire import WireEvent, cleared, encode_batch, removed, stored

BLOCK = 4
CHAINS = 5
CHAIN_BLOCKS = 8
PODS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
TOKENS_MODEL = "m-tokens"
VLLM_MODEL = "m-vllm"
SEED = "42"
CAPACITY = 40
TTL = 30.0


def chain_tokens(chain: int) -> list[int]:
    return [(chain * 7919 + i * 31) % 50_000 for i in range(CHAIN_BLOCKS * BLOCK)]


def tokens_hashes(chain: int) -> list[int]:
    return [(chain + 1) << 32 | i for i in range(CHAIN_BLOCKS)]


_VLLM = VllmKeys("sha256_cbor", SEED)
VLLM_HASHES = [_VLLM.block_keys(chain_tokens(c), BLOCK) for c in range(CHAINS)]


@dataclass(frozen=True)
class Op:
    """One frame of the stream, or the clock moving on (``advance`` seconds)."""

    pod: int = 0
    rank: int = 0
    rank_in_batch: bool = False
    model: str = TOKENS_MODEL
    events: tuple[tuple[str, int, int, int, int], ...] = ()
    """(kind, chain, first block, blocks, tier) per event."""
    seq: str = "next"  # next, gap, restart, repeat
    garbage: bool = False
    unnamed: bool = False
    advance: float = 0.0


events = st.tuples(
    st.sampled_from(["store", "store", "store", "offload", "remove", "clear"]),
    st.integers(0, CHAINS - 1),
    st.integers(0, CHAIN_BLOCKS - 1),
    st.integers(1, 4),
    st.integers(0, 2),
)
frames = st.builds(
    Op,
    pod=st.integers(0, len(PODS) - 1),
    rank=st.integers(0, 1),
    rank_in_batch=st.booleans(),
    model=st.sampled_from([TOKENS_MODEL, TOKENS_MODEL, VLLM_MODEL]),
    events=st.lists(events, min_size=1, max_size=3).map(tuple),
    seq=st.sampled_from(["next"] * 8 + ["gap", "restart", "repeat"]),
    garbage=st.integers(0, 15).map(lambda n: n == 0),
    unnamed=st.integers(0, 15).map(lambda n: n == 0),
)
ops = st.lists(
    st.one_of(frames, st.builds(Op, advance=st.sampled_from([0.07, 1.0, TTL]))),
    max_size=30,
)


def wire_event(kind: str, chain: int, first: int, blocks: int, tier: int, model: str) -> WireEvent:
    last = min(CHAIN_BLOCKS, first + blocks)
    hashes = (VLLM_HASHES[chain] if model == VLLM_MODEL else tokens_hashes(chain))[first:last]
    medium = (None, "CPU", "DISK")[tier]
    if kind == "store":
        tokens = chain_tokens(chain)[first * BLOCK : last * BLOCK]
        parent = None if first == 0 else hashes_of(chain, model)[first - 1]
        return stored(hashes, tokens, block_size=BLOCK, parent=parent, medium=medium)
    if kind == "offload":
        return stored(hashes, [], block_size=0, medium=medium or "CPU")
    if kind == "remove":
        return removed(hashes, medium=medium)
    return cleared()


def hashes_of(chain: int, model: str) -> list[int]:
    return VLLM_HASHES[chain] if model == VLLM_MODEL else tokens_hashes(chain)


class Stream:
    """Turns ops into frames, keeping each (pod, rank)'s sequence numbers."""

    def __init__(self) -> None:
        self.seq: dict[tuple[int, int], int] = {}
        self.received = 1_700_000_000.0

    def frame(self, op: Op) -> Frame:
        key = (op.pod, op.rank)
        nxt = self.seq.get(key, 0)
        seq = {"next": nxt, "gap": nxt + 2, "restart": 0, "repeat": max(0, nxt - 1)}[op.seq]
        self.seq[key] = seq + 1
        self.received += 0.001
        if op.garbage:
            payload = b"\xc1 not msgpack"
        else:
            batch = [wire_event(*event, model=op.model) for event in op.events]
            payload = encode_batch(
                batch,
                ts=self.received,
                version="0.33",
                dp_rank=op.rank if op.rank_in_batch else None,
            )
        topic = b"kv@" if op.unnamed else f"kv@{PODS[op.pod]}@{op.model}".encode()
        source_rank = 0 if op.rank_in_batch else op.rank
        return Frame(Source(rank=source_rank), topic, seq, payload, self.received)


async def observe(plane: DataPlane) -> dict[str, object]:
    """Everything a user can see of a plane: answers, status, counts, warnings."""
    answers = []
    for model in (TOKENS_MODEL, VLLM_MODEL):
        for chain in range(CHAINS):
            tokens = chain_tokens(chain)
            for blocks in (1, CHAIN_BLOCKS // 2, CHAIN_BLOCKS):
                answers.append(await plane.lookup(model, token_ids=tokens[: blocks * BLOCK]))
            answers.append(await plane.lookup(model, block_hashes=hashes_of(chain, model)))
    counts = dataclasses.asdict(plane.counts())
    drops = {reason: n for reason, n in counts.pop("drops").items() if n}
    del counts["lag_sum"]  # now - the engine's timestamp: the planes read "now" apart
    return {
        "answers": answers,
        "pods": await plane.pods(),
        "streams": sorted(
            (dataclasses.replace(s, lag=0.0) for s in plane.streams()),
            key=lambda s: (s.pod_id, s.dp_rank),
        ),
        "models": [m for m in await plane.models() if m.pods or m.configured],
        "counts": counts,
        "drops": drops,
        "warnings": plane.warnings(),
    }


def planes(now: list[float]) -> tuple[NativeDataPlane, DataPlane]:
    config = settings_for_tests(
        index={"ttl": TTL, "max_size": CAPACITY},
        models=[{"name": VLLM_MODEL, "key_mode": "vllm", "hash_algorithm": "sha256_cbor",
                 "hash_seed": SEED}],
    )  # fmt: skip
    native = make_plane("native", config)
    assert isinstance(native, NativeDataPlane)
    native.freeze_clock(now[0])
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    python = make_plane("python", config, index=ReferenceIndex(ttl=TTL, max_entries=CAPACITY,
                                                               clock=clock))  # fmt: skip
    return native, python


async def run(stream_ops: list[Op]) -> None:
    now = [1000.0]
    native, python = planes(now)
    stream = Stream()
    try:
        for step, op in enumerate(stream_ops):
            if op.advance:
                now[0] += op.advance
                native.freeze_clock(now[0])
            else:
                frame = stream.frame(op)
                await native.ingest_frame(frame)
                await python.ingest_frame(frame)
            ours, reference = await observe(native), await observe(python)
            assert ours == reference, f"planes differ after step {step}: {op}"
    finally:
        await native.stop()
        await python.stop()


@settings(max_examples=150)
@given(ops)
def test_native_plane_matches_the_python_plane(stream_ops: list[Op]) -> None:
    asyncio.run(run(stream_ops))


def test_a_duplicate_copy_keeps_the_block_until_its_last_removal() -> None:
    """The issue's case from outside: BlockStored([a, b]) twice, BlockRemoved([b]) once."""
    store = Op(events=(("store", 0, 0, 2, 0),))
    remove = Op(events=(("remove", 0, 1, 1, 0),))
    asyncio.run(run([store, store, remove, remove]))
