"""Benchmark: decoding vLLM KV-event batches, msgspec vs msgpack, decode only.

    .venv/bin/python -m loadtest.bench_decode [--seconds 0.5]

For each batch shape, prints the best of several timed runs (µs per batch, events/s,
blocks/s) for:

- ``msgspec typed``: :func:`service.events.vllm.decode_batch` as shipped (typed Structs,
  validated in C, then domain events);
- ``msgspec any + py``: msgspec to plain Python objects, then the decoder's plain-Python
  checks into the same domain events;
- ``msgpack + py``: the same with ``msgpack.unpackb``;
- ``* parse only``: each library's bare msgpack parse, no checks, no domain events: the floor
  a decoder built on it cannot beat.

Every decoder is first checked to produce the same events as ``decode_batch``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version

import msgpack
import msgspec

from service.events.model import BlockRemoved, BlockStored, Event, EventBatch, Tier
from service.events.vllm import DecodeError, _event_from_object, _Skip, decode_batch
from tests.support.vllm_wire import (
    HashStyle,
    RawEvent,
    Version,
    WireEvent,
    encode_batch,
    raw,
    removed,
    stored,
)

__all__ = ["main"]

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Shape:
    """One batch to decode again and again."""

    name: str
    payload: bytes
    events: int
    blocks: int


def _stored_events(n_events: int, blocks_per_event: int) -> list[WireEvent]:
    events: list[WireEvent] = []
    for e in range(n_events):
        base = (e * 1_000_003 + 12345) * 0x9E37_79B9_7F4A_7C15
        hashes = [(base + b * 0x1234_5678_9ABC) % (1 << 64) for b in range(blocks_per_event)]
        tokens = [(e * 7919 + i) % 151_000 for i in range(blocks_per_event * BLOCK_SIZE)]
        # What a 0.23 engine really fills in: group and spec fields on every event.
        events.append(
            stored(
                hashes,
                tokens,
                block_size=BLOCK_SIZE,
                parent=hashes[0] ^ 1,
                medium="GPU",
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )
    return events


def _shape(
    name: str,
    events: list[WireEvent | RawEvent],
    *,
    version: Version = "0.23",
    hash_style: HashStyle = "uint",
) -> Shape:
    payload = encode_batch(events, ts=1.7e9, dp_rank=0, version=version, hash_style=hash_style)
    decoded = decode_batch(payload).events
    blocks = sum(len(e.block_hashes) for e in decoded if isinstance(e, BlockStored | BlockRemoved))
    return Shape(name, payload, len(events), blocks)


def shapes() -> list[Shape]:
    """The batch shapes measured: what engines send under prefill-heavy and decode-heavy load."""
    one_big: list[WireEvent | RawEvent] = [*_stored_events(1, 32)]
    many_small: list[WireEvent | RawEvent] = [*_stored_events(32, 1)]
    removals: list[WireEvent | RawEvent] = [removed([h], medium="GPU") for h in range(32)]
    one_bad: list[WireEvent | RawEvent] = [*many_small[:31], raw(["BlockStored", [1.5]])]
    return [
        _shape("1 ev x 1 blk, array 0.23", [*_stored_events(1, 1)]),
        _shape("1 ev x 32 blk, array 0.23", one_big),
        _shape("32 ev x 1 blk, array 0.23", many_small),
        _shape("1 ev x 32 blk, map events 0.33", one_big, version="0.33"),
        _shape("32 ev x 1 blk, map events 0.33", many_small, version="0.33"),
        _shape("1 ev x 32 blk, bytes hashes", one_big, hash_style="bytes"),
        _shape("1 ev x 32 blk, signed hashes", one_big, hash_style="int"),
        _shape("32 removed x 1 blk, array", removals),
        _shape("32 ev, 1 malformed (per-event path)", one_bad),
    ]


def _from_python(obj: object) -> EventBatch:
    """A batch from plain Python objects with the decoder's own plain-Python event checks."""
    if isinstance(obj, list) and len(obj) >= 2:
        ts, events, rank = obj[0], obj[1], obj[2] if len(obj) > 2 else None
    elif isinstance(obj, dict) and "ts" in obj and "events" in obj:
        ts, events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    else:
        raise DecodeError("batch_shape")
    if type(ts) not in (int, float) or not isinstance(events, list):
        raise DecodeError("batch_shape")
    if rank is not None and (type(rank) is not int or rank < 0):
        raise DecodeError("batch_shape")
    decoded: list[Event] = []
    skipped: dict[str, int] = {}
    for event in events:
        try:
            decoded.append(_event_from_object(event))
        except _Skip as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    return EventBatch(float(ts), tuple(decoded), rank, skipped)


_any_decoder = msgspec.msgpack.Decoder()


def _msgspec_any(payload: bytes) -> EventBatch:
    return _from_python(_any_decoder.decode(payload))


def _msgpack_py(payload: bytes) -> EventBatch:
    return _from_python(msgpack.unpackb(payload))


def _msgspec_parse(payload: bytes) -> object:
    return _any_decoder.decode(payload)


def _msgpack_parse(payload: bytes) -> object:
    result: object = msgpack.unpackb(payload)
    return result


DECODERS: dict[str, Callable[[bytes], object]] = {
    "msgspec typed": decode_batch,
    "msgspec any + py": _msgspec_any,
    "msgpack + py": _msgpack_py,
    "msgspec parse only": _msgspec_parse,
    "msgpack parse only": _msgpack_parse,
}


def _best_seconds_per_call(fn: Callable[[bytes], object], payload: bytes, budget: float) -> float:
    """Best of 5 timed runs, each about ``budget / 5`` seconds long."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.02:
        fn(payload)
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    number = max(1, int(budget / 5 / per_call))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            fn(payload)
        best = min(best, (time.perf_counter() - start) / number)
    return best


def _check_same_events(shape: Shape) -> None:
    expected = decode_batch(shape.payload)
    for name in ("msgspec any + py", "msgpack + py"):
        got = DECODERS[name](shape.payload)
        if got != expected:
            raise SystemExit(f"{name} decodes {shape.name!r} differently: {got} != {expected}")


class _StructStored(msgspec.Struct, frozen=True, gc=False):
    """BlockStored's fields as a frozen msgspec Struct: the alternative measured below."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    tier: Tier = Tier.GPU
    lora_name: str | None = None
    lora_id: int | None = None
    extra_keys: tuple[object, ...] | None = None


def _print_construction_costs(budget: float) -> None:
    """What building one domain event costs: model.py's frozen dataclass vs a Struct."""
    args = ((1,), None, (), BLOCK_SIZE, Tier.GPU, None, None, None)
    makers: dict[str, Callable[[bytes], object]] = {
        "BlockStored (frozen slots dataclass), positional": lambda _: BlockStored(*args),
        "same fields as frozen msgspec.Struct, positional": lambda _: _StructStored(*args),
    }
    print("\n| construct one event | µs |\n|---|---:|")
    for name, make in makers.items():
        print(f"| {name} | {_best_seconds_per_call(make, b'', budget) * 1e6:.2f} |")


def main(argv: list[str] | None = None) -> None:
    """Run every decoder on every shape and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.5, help="time budget per cell")
    args = parser.parse_args(argv)

    print(
        f"python {platform.python_version()}, msgspec {package_version('msgspec')}, "
        f"msgpack {package_version('msgpack')}, {platform.machine()}, "
        f"best of 5 runs of ~{args.seconds / 5:.2f}s each\n"
    )
    print("| shape | bytes | decoder | µs/batch | µs/event | events/s | blocks/s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for shape in shapes():
        _check_same_events(shape)
        for name, fn in DECODERS.items():
            seconds = _best_seconds_per_call(fn, shape.payload, args.seconds)
            print(
                f"| {shape.name} | {len(shape.payload)} | {name} | {seconds * 1e6:.2f} | "
                f"{seconds * 1e6 / shape.events:.2f} | {shape.events / seconds:,.0f} | "
                f"{shape.blocks / seconds:,.0f} |",
                flush=True,
            )
    _print_construction_costs(args.seconds)


if __name__ == "__main__":
    main()
