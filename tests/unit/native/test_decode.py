"""The native vLLM event decoder (native/decode.cpp) against its reference,
service/events/vllm.py decode_batch: the same errors, timestamps, ranks, events and skip
counts for every payload, well-formed or not.

Payloads come from every vLLM release's encoder (tests/support/vllm_wire.py), then get
broken: a field replaced by an arbitrary value, every msgpack header re-encoded at a random
width, bytes flipped, cut or inserted. The one deliberate difference (native/decode.cpp,
the comment at the top) is nesting past the reference's recursion limit: `same()` leaves
payloads nested deeper than SAME_DEPTH out, and the tests at the end check the native side
of it. (The other one, payloads over 4 GiB, is too big to test.)
"""

from __future__ import annotations

import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import _dataplane
from service.events import vllm
from service.events.model import BlockRemoved, BlockStored, Event
from tests.support.vllm_wire import (
    VERSIONS,
    Envelope,
    HashStyle,
    Version,
    WireEvent,
    cleared,
    encode_batch,
    encode_event,
    pack,
    removed,
    stored,
)

U64 = (1 << 64) - 1
# Deepest nesting (containers open at once) the reference surely handles under pytest: its
# limit is Python's recursion limit (1000) minus the frames in use, the native one 1000.
SAME_DEPTH = 500
NATIVE_DEPTH = 1000

# --- both decoders, in one comparable form ----------------------------------------------

Outcome = tuple[Any, ...]


def _float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def _canon(value: object) -> object:
    """A decoded value in a form that compares by content (NaN, Ext, list vs tuple)."""
    if isinstance(value, float):
        return ("float", _float_bits(value))
    if isinstance(value, msgspec.msgpack.Ext):
        return ("ext", value.code, value.data)
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(map(_canon, value)))
    if isinstance(value, dict):
        return ("dict", tuple((_canon(k), _canon(v)) for k, v in value.items()))
    return (type(value).__name__, value)


def _extra(entry: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """An extra_keys entry as the native decoder describes one."""
    if entry is None:
        return None
    first = entry[0] if entry and isinstance(entry[0], str) else None
    second = entry[1] if len(entry) > 1 and isinstance(entry[1], str) else None
    return (len(entry), first, second, _canon(tuple(entry)))


def _reference_event(event: Event) -> tuple[Any, ...]:
    if isinstance(event, BlockStored):
        extra = event.extra_keys
        return (
            "BlockStored",
            tuple(event.block_hashes),
            event.parent_block_hash,
            tuple(event.token_ids),
            event.block_size,
            int(event.tier),
            event.lora_name,
            event.lora_id,
            None if extra is None else tuple(_extra(e) for e in extra),  # type: ignore[arg-type]
        )
    if isinstance(event, BlockRemoved):
        return ("BlockRemoved", tuple(event.block_hashes), int(event.tier))
    return ("AllBlocksCleared",)


def reference(payload: bytes) -> Outcome:
    try:
        batch = vllm.decode_batch(payload)
    except vllm.DecodeError as exc:
        return ("error", exc.reason)
    events = tuple(_reference_event(e) for e in batch.events)
    return (_float_bits(batch.ts), batch.data_parallel_rank, events, batch.skipped)


def _native_event(event: tuple[Any, ...]) -> tuple[Any, ...]:
    if event[0] != "BlockStored" or event[8] is None:
        return event
    extras: list[tuple[Any, ...] | None] = []
    for entry in event[8]:
        if entry is None:
            extras.append(None)
            continue
        length, first, second, raw = entry
        extras.append((length, first, second, _canon(tuple(msgspec.msgpack.decode(raw)))))
    return (*event[:8], tuple(extras))


def native(payload: bytes) -> Outcome:
    try:
        ts, rank, events, skipped = _dataplane.decode_batch(payload)
    except ValueError as exc:
        return ("error", str(exc))
    return (_float_bits(ts), rank, tuple(map(_native_event, events)), skipped)


def nesting_depth(payload: bytes) -> int:
    """Most containers open at once while walking the payload's values (up to any bad byte)."""
    pending: list[int] = []  # values still to read, per open container
    deepest = pos = 0
    while pos < len(payload) and (header := _header(payload, pos)) is not None:
        children, size, container = header
        pos += size
        if pending:
            pending[-1] -= 1
        if container:
            deepest = max(deepest, len(pending) + 1)
            if children:
                pending.append(children)
        while pending and pending[-1] == 0:
            pending.pop()
    return deepest


_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4}
_FIXED |= {0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}
_SIZED |= {0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _header(payload: bytes, pos: int) -> tuple[int, int, bool] | None:
    """(values that follow, bytes of header and inline data, is a container) at pos."""
    op = payload[pos]
    if op <= 0x7F or op >= 0xE0 or op in (0xC0, 0xC2, 0xC3):
        return 0, 1, False
    if op <= 0x9F:
        return (op & 0x0F) * (2 if op <= 0x8F else 1), 1, True
    if op <= 0xBF:
        return 0, 1 + (op & 0x1F), False
    if op in _FIXED:
        return 0, 1 + _FIXED[op], False
    if op in _SIZED:
        width, code = _SIZED[op]
        return 0, 1 + width + code + int.from_bytes(payload[pos + 1 : pos + 1 + width]), False
    if op in _CONTAINERS:
        width, per = _CONTAINERS[op]
        return int.from_bytes(payload[pos + 1 : pos + 1 + width]) * per, 1 + width, True
    return None


def same(payload: bytes) -> Outcome:
    """Asserts both decoders agree on `payload` (when it is not too deep to) and returns it."""
    outcome = native(payload)
    if nesting_depth(payload) <= SAME_DEPTH:
        assert outcome == reference(payload), payload.hex()
    return outcome


# --- values to encode, and an encoder that picks every header's width at random ----------


@dataclass(frozen=True)
class Str:
    """A msgpack str of any bytes, valid UTF-8 or not."""

    data: bytes


@dataclass(frozen=True)
class Ext:
    code: int
    data: bytes


@dataclass(frozen=True)
class Map:
    """A msgpack map as pairs: keys may repeat or be unhashable in Python."""

    pairs: tuple[tuple[object, object], ...]


@dataclass(frozen=True)
class F32:
    value: float


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are: a value already encoded."""

    data: bytes


def _uint_forms(value: int) -> list[bytes]:
    forms = [b"\xcc" + value.to_bytes(1)] if value < 1 << 8 else []
    forms += [b"\xcd" + value.to_bytes(2)] if value < 1 << 16 else []
    forms += [b"\xce" + value.to_bytes(4)] if value < 1 << 32 else []
    forms += [b"\xcf" + value.to_bytes(8)]
    for code, width in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        if value < 1 << (8 * width - 1):
            forms.append(bytes([code]) + value.to_bytes(width))
    return forms + ([bytes([value])] if value < 0x80 else [])


def _int_forms(value: int) -> list[bytes]:
    if value >= 0:
        return _uint_forms(value)
    forms = [bytes([value & 0xFF])] if value >= -32 else []
    for code, width in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        if value >= -(1 << (8 * width - 1)):
            forms.append(bytes([code]) + value.to_bytes(width, signed=True))
    return forms


def _length_forms(n: int, fix: tuple[int, int] | None, *sized: tuple[int, int]) -> list[bytes]:
    """Headers for a length or count n: the fixed form (code, limit), then (code, width)."""
    forms = [bytes([fix[0] | n])] if fix is not None and n < fix[1] else []
    forms += [bytes([code]) + n.to_bytes(width) for code, width in sized if n < 1 << (8 * width)]
    return forms


def encode(value: object, rnd: random.Random) -> bytes:
    """msgpack of `value` (Python values and the classes above), each header at a width
    drawn from the valid ones."""
    out = bytearray()
    _encode(value, rnd, out)
    return bytes(out)


def _encode(value: object, rnd: random.Random, out: bytearray) -> None:
    if value is None:
        out += b"\xc0"
    elif isinstance(value, bool):
        out += b"\xc3" if value else b"\xc2"
    elif isinstance(value, int):
        out += rnd.choice(_int_forms(value))
    elif isinstance(value, float):
        out += b"\xcb" + struct.pack(">d", value)
    elif isinstance(value, F32):
        out += b"\xca" + struct.pack(">f", value.value)
    elif isinstance(value, Raw):
        out += value.data
    elif isinstance(value, str | Str):
        data = value.encode() if isinstance(value, str) else value.data
        out += rnd.choice(_length_forms(len(data), (0xA0, 32), (0xD9, 1), (0xDA, 2), (0xDB, 4)))
        out += data
    elif isinstance(value, bytes):
        out += rnd.choice(_length_forms(len(value), None, (0xC4, 1), (0xC5, 2), (0xC6, 4)))
        out += value
    elif isinstance(value, Ext):
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        forms = _length_forms(len(value.data), None, (0xC7, 1), (0xC8, 2), (0xC9, 4))
        forms += [bytes([fixed[len(value.data)]])] if len(value.data) in fixed else []
        out += rnd.choice(forms) + value.code.to_bytes(1, signed=True) + value.data
    elif isinstance(value, list | tuple):
        out += rnd.choice(_length_forms(len(value), (0x90, 16), (0xDC, 2), (0xDD, 4)))
        for item in value:
            _encode(item, rnd, out)
    elif isinstance(value, dict | Map):
        pairs = tuple(value.items()) if isinstance(value, dict) else value.pairs
        out += rnd.choice(_length_forms(len(pairs), (0x80, 16), (0xDE, 2), (0xDF, 4)))
        for key, item in pairs:
            _encode(key, rnd, out)
            _encode(item, rnd, out)
    else:
        raise TypeError(f"cannot encode {value!r}")


# --- strategies ---------------------------------------------------------------------------

_hash64 = st.integers(0, U64)
_medium = st.sampled_from(
    [None, "GPU", "cpu", "Disk", "STORAGE", "NVME", "gpu ", "", "\u017ftorage", "d\u0131sk"]
)
_text = st.text(max_size=6) | st.sampled_from(["salt", "\u00e9", "\U0001f600"])


@st.composite
def _wire_stored(draw: st.DrawFn) -> WireEvent:
    n = draw(st.integers(0, 4))
    block_size = draw(st.integers(0, 4))
    with_tokens = draw(st.booleans())
    tokens = draw(
        st.lists(st.integers(0, U64 >> 32), min_size=n * block_size, max_size=n * block_size)
        if with_tokens
        else st.just([])
    )
    extra_entry = st.none() | st.tuples(_text) | st.tuples(_text, _text) | st.tuples()
    extra = st.lists(extra_entry, min_size=n, max_size=n)
    return stored(
        draw(st.lists(_hash64, min_size=n, max_size=n)),
        tokens,
        block_size=block_size,
        parent=draw(st.none() | _hash64),
        medium=draw(_medium),
        lora_name=draw(st.none() | _text),
        lora_id=draw(st.none() | st.integers(-(1 << 63), U64)),
        extra_keys=draw(st.none() | extra),
        group_idx=draw(st.none() | st.integers(0, 3)),
        kv_cache_spec_kind=draw(st.none() | st.just("full_attention")),
    )


_wire_removed = st.builds(
    lambda hashes, medium: removed(hashes, medium=medium),
    st.lists(_hash64, max_size=4),
    _medium,
)
_wire_event = _wire_stored() | _wire_removed | st.just(cleared())
_version = st.sampled_from(VERSIONS)
_hash_style: st.SearchStrategy[HashStyle] = st.sampled_from(["uint", "int", "bytes"])
_envelope: st.SearchStrategy[Envelope] = st.sampled_from(["array", "map"])
_ts = st.floats() | st.integers(-(1 << 63), U64)
_rank = st.none() | st.integers(0, U64)

_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats()
    | st.floats(width=32).map(F32)
    | st.binary(max_size=12)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "type", "ts"])
    | _text
    | st.sampled_from(
        [b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"a\xe2\x82", b"\xf4\x90\x80\x80"]
    ).map(Str)
    | st.builds(Ext, st.integers(-128, 127), st.binary(max_size=17))
    | st.builds(
        Ext, st.just(-1), st.binary(min_size=4, max_size=4) | st.binary(min_size=12, max_size=12)
    )
)
_key = st.sampled_from(
    ["type", "block_hashes", "token_ids", "block_size", "medium", "extra_keys", "events", "ts"]
)
_object: st.SearchStrategy[object] = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(st.tuples(_key | inner, inner), max_size=4).map(lambda p: Map(tuple(p)))
    ),
    max_leaves=20,
)


@st.composite
def _event_value(draw: st.DrawFn) -> object:
    """An event as some release encodes it, often with one part replaced, added or dropped."""
    encoded = encode_event(draw(_wire_event), version=draw(_version), hash_style="uint")
    change = draw(st.sampled_from(["none", "replace", "drop", "add", "duplicate"]))
    if change == "none":
        return encoded
    if isinstance(encoded, list):
        if change == "replace":
            encoded[draw(st.integers(0, len(encoded) - 1))] = draw(_object)
        elif change == "drop" and encoded:
            del encoded[draw(st.integers(0, len(encoded) - 1)) :]
        else:
            encoded.append(draw(_object))
        return encoded
    assert isinstance(encoded, dict)
    pairs = list(encoded.items())
    index = draw(st.integers(0, len(pairs) - 1))
    if change == "replace":
        pairs[index] = (pairs[index][0], draw(_object))
    elif change == "drop":
        del pairs[index]
    elif change == "add":
        pairs.insert(index, (draw(_key | _object), draw(_object)))
    else:
        pairs.insert(draw(st.integers(0, len(pairs))), (pairs[index][0], draw(_object)))
    return Map(tuple(pairs))


_batch_item = _object | st.lists(_event_value(), max_size=2) | _ts


@st.composite
def _batch_value(draw: st.DrawFn) -> object:
    """A batch, mostly well-shaped, of events that are mostly well-formed."""
    events = draw(st.lists(_event_value() | _object, max_size=5))
    ts, rank = draw(_ts), draw(_rank)
    form = draw(st.sampled_from(["array", "array2", "array+", "map", "map+", "other"]))
    if form == "array":
        return [ts, events, rank]
    if form == "array2":
        return [ts, events]
    if form == "array+":
        return [ts, events, rank, *draw(st.lists(_object, max_size=2))]
    if form == "map":
        fields = [("ts", ts), ("events", events), ("data_parallel_rank", rank)]
        return Map(tuple(draw(st.permutations(fields))))
    if form == "map+":  # a key repeated, another added, the rank left out
        pairs: list[tuple[object, object]] = [("events", events), ("ts", ts)]
        again = draw(st.sampled_from(["events", "ts"]))
        value = st.lists(_event_value(), max_size=2) if again == "events" else _ts
        pairs.append((again, draw(value)))
        pairs.insert(draw(st.integers(0, 3)), (draw(_key | _object), draw(_batch_item)))
        return Map(tuple(pairs))
    return draw(_object)


def _mutate(payload: bytes, rnd: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rnd.randint(1, 3)):
        at = rnd.randint(0, len(data))
        action = rnd.choice(["flip", "set", "insert", "delete", "truncate"])
        if action == "truncate":
            del data[at:]
        elif action == "delete":
            del data[at : at + rnd.randint(1, 4)]
        elif action == "insert":
            data[at:at] = rnd.randbytes(rnd.randint(1, 4))
        elif at < len(data):
            data[at] = rnd.randrange(256) if action == "set" else data[at] ^ (1 << rnd.randrange(8))
    return bytes(data)


# --- properties -----------------------------------------------------------------------------

# The properties that build whole batches: worth more examples than the default 100.
_MORE = settings(max_examples=250)


@_MORE
@given(
    events=st.lists(_wire_event, max_size=5),
    version=_version,
    hash_style=_hash_style,
    envelope=_envelope,
    ts=_ts,
    rank=_rank,
)
def test_every_release_shape(
    events: list[WireEvent],
    version: Version,
    hash_style: HashStyle,
    envelope: Envelope,
    ts: float,
    rank: int | None,
) -> None:
    payload = encode_batch(
        events, ts=ts, dp_rank=rank, version=version, hash_style=hash_style, envelope=envelope
    )

    outcome = same(payload)

    assert outcome[0] != "error"


@_MORE
@given(batch=_batch_value(), rnd=st.randoms(use_true_random=False))
def test_batches_encoded_at_any_width(batch: object, rnd: random.Random) -> None:
    same(encode(batch, rnd))


@_MORE
@given(batch=_batch_value(), rnd=st.randoms(use_true_random=False))
def test_mutated_bytes(batch: object, rnd: random.Random) -> None:
    same(_mutate(encode(batch, rnd), rnd))


@_MORE
@given(value=_object, rnd=st.randoms(use_true_random=False))
def test_any_msgpack_value(value: object, rnd: random.Random) -> None:
    same(encode(value, rnd))


@given(payload=st.binary(max_size=64))
def test_any_bytes(payload: bytes) -> None:
    same(payload)


@pytest.mark.skipif(
    "KV_CACHE_DECODE_CORPUS" not in os.environ, reason="run by scripts/fuzz_decode.sh"
)
def test_fuzz_corpus() -> None:
    """Every input libFuzzer kept (it keeps those reaching new code), as a differential test."""
    paths = sorted(Path(os.environ["KV_CACHE_DECODE_CORPUS"]).iterdir())
    for path in paths:
        same(path.read_bytes())
    assert paths


@given(
    prefix=st.sampled_from(
        [b"\x93\x00\x91", b"\x92\xcb" + bytes(8) + b"\x92", b"\x81\xa6events\x91"]
    ),
    payload=st.binary(max_size=40),
)
def test_any_bytes_as_an_event(prefix: bytes, payload: bytes) -> None:
    same(prefix + payload)


# --- explicit cases -------------------------------------------------------------------------

H1, H2 = 0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210
cleared_event = ["AllBlocksCleared"]
TOKENS = tuple(range(1000, 1032))


def test_a_release_batch_decodes_to_plain_tuples() -> None:
    payload = encode_batch(
        [
            stored(
                [H1, H2],
                TOKENS,
                parent=H1,
                medium="CPU",
                lora_name="sql",
                lora_id=3,
                extra_keys=[("sql", "salt"), None],
            ),
            removed([H2], medium="disk"),
            cleared(),
        ],
        ts=2.5,
        dp_rank=1,
        version="0.23",
    )

    ts, rank, events, skipped = _dataplane.decode_batch(payload)

    assert (ts, rank, skipped) == (2.5, 1, {})
    entry = (2, "sql", "salt", pack(["sql", "salt"]))
    assert events == [
        ("BlockStored", (H1, H2), H1, TOKENS, 16, 1, "sql", 3, (entry, None)),
        ("BlockRemoved", (H2,), 2),
        ("AllBlocksCleared",),
    ]
    assert native(payload) == reference(payload)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),
        (b"\x92\x01\x90\x00", "msgpack"),  # a trailing byte
        (b"\xdd\xff\xff\xff\xff", "msgpack"),  # 2**32 - 1 elements announced, none there
        (b"\x92\x01\xdd\xff\xff\xff\xff\x00", "msgpack"),
        (b"\x92\x01\x91\xdf\xff\xff\xff\xff", "msgpack"),
        (pack([]), "batch_shape"),
        (pack([1.0]), "batch_shape"),
        (pack([1.0, [], -1]), "batch_shape"),
        (pack({"ts": 1.0}), "batch_shape"),
        (pack({"ts": 1.0, "events": [], 7: 1}), "batch_shape"),  # the typed batch has str keys
        (b"\x92\xa1x\x91\xa1\xff", "msgpack"),  # a bad shape, and a str that is not UTF-8
        (b"\x92\xa1x\x91\x81\x80\x00", "msgpack"),  # ... and a map key Python cannot hash
    ],
)
def test_batch_errors(payload: bytes, reason: str) -> None:
    assert same(payload) == ("error", reason)


def test_a_repeated_batch_key_counts_last() -> None:
    first = [["BlockRemoved", [H1]], ["BlockStored", [1.5], None, [], 16]]
    payload = encode(
        Map((("events", first), ("ts", 1), ("events", [cleared_event]), ("ts", 2))),
        random.Random(0),
    )

    assert same(payload) == (_float_bits(2.0), None, (("AllBlocksCleared",),), {})


def test_tokens_must_fill_the_blocks_without_overflow() -> None:
    # 2 * (2**63 + 1) is 2 modulo 2**64.
    payload = pack([1.0, [["BlockStored", [H1, H2], None, [1, 2], (1 << 63) + 1]], 0])

    assert same(payload)[3] == {"bad_field": 1}


@pytest.mark.parametrize(
    "value",
    [
        *(0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, U64),
        *(-1, -32, -33, -128, -129, -32768, -32769, -(1 << 31), -(1 << 31) - 1, -(1 << 63)),
    ],
)
@pytest.mark.parametrize(
    "field", ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "ts"]
)
def test_integers_at_every_width_in_every_field(field: str, value: int) -> None:
    rnd = random.Random(value)
    for form in map(Raw, _int_forms(value)):
        fields: dict[str, object] = {"type": "BlockStored", "block_hashes": [H1]}
        if field == "token_ids":
            fields |= {"token_ids": [form], "block_size": 1}
        elif field == "block_hashes":
            fields["block_hashes"] = [form]
        elif field != "ts":
            fields[field] = form
        same(encode([form if field == "ts" else 1.0, [fields], form], rnd))


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        *(("gpu", 0), ("Cpu", 1), ("disk", 2), ("\u017ftorage", 2), ("d\u0131sk", 2)),
        *(("\ufb06orage", 2), ("\ufb05orage", 2), ("DISK\u0131", None), ("\u00dfTORAGE", None)),
    ],
)
def test_medium_is_matched_as_python_uppercases_it(medium: str, tier: int | None) -> None:
    outcome = same(pack([1.0, [["BlockRemoved", [H1], medium]], 0]))

    if tier is None:
        assert outcome[2:] == ((), {"unknown_medium": 1})
    else:
        assert outcome[2] == (("BlockRemoved", (H1,), tier),)


def _event(*pairs: tuple[bytes, bytes]) -> bytes:
    """A map event from encoded keys and values, in a batch."""
    return (
        b"\x93\x01\x91" + bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs) + b"\x00"
    )


TYPE = (pack("type"), pack("BlockStored"))
HASHES = (pack("block_hashes"), pack([H1]))
NOT_UTF8 = b"\xa1\xff"
UNHASHABLE = b"\x81\x80\x00"  # {{}: 0}


@pytest.mark.parametrize(
    ("payload", "skipped"),
    [
        # The typed decode skips unknown fields unread...
        (_event(TYPE, HASHES, (pack("x"), NOT_UTF8)), {}),
        (_event(TYPE, HASHES, (pack("x"), UNHASHABLE)), {}),
        (_event(TYPE, HASHES, (pack("x"), b"\xd6\xff" + bytes(4))), {}),
        # ... but an event it refuses is decoded untyped, which refuses them.
        (_event(TYPE, HASHES, (pack("x"), NOT_UTF8), (pack("block_size"), pack(-1))), None),
        (_event(TYPE, HASHES, (pack("block_size"), pack(-1))), {"bad_field": 1}),
        (_event(TYPE, HASHES, (pack("medium"), NOT_UTF8)), None),
        (_event(TYPE, HASHES, (pack("extra_keys"), b"\x91\x91" + NOT_UTF8)), None),
        (_event(TYPE, HASHES, (pack("extra_keys"), b"\x91\x91" + UNHASHABLE)), None),
        # Keys other than str: the typed decode refuses them, the untyped one does not.
        (_event(TYPE, HASHES, (pack(5), pack(1))), {}),
        (_event(TYPE, HASHES, (pack([1]), pack(1))), {}),
        (_event(TYPE, HASHES, (b"\x91\x80", pack(1))), None),
        (_event(TYPE, HASHES, (b"\xd4\x01\x00", pack(1))), None),
        # A repeated "type": the untyped dict keeps the last one.
        (_event(TYPE, HASHES, (pack("type"), pack("BlockRemoved"))), {}),
        (_event(TYPE, HASHES, (pack("type"), pack("BlockUpdated"))), {"unknown_type": 1}),
        (_event(TYPE, HASHES, (pack("type"), pack(1))), None),
        (_event((pack("type"), pack(1)), TYPE, HASHES), {}),
        # ... and the typed decode refuses two: then every byte must decode untyped.
        (_event(TYPE, HASHES, (pack("type"), pack("BlockRemoved")), (pack("x"), NOT_UTF8)), None),
        (_event((pack("type"), pack(1)), TYPE, HASHES, (pack("x"), NOT_UTF8)), None),
        # Fields of another event type are not looked at.
        (_event((pack("type"), pack("BlockRemoved")), HASHES, (pack("token_ids"), pack(1))), {}),
    ],
)
def test_what_each_decode_of_an_event_looks_at(
    payload: bytes, skipped: dict[str, int] | None
) -> None:
    outcome = same(payload)

    assert outcome[3] == ({"event_shape": 1} if skipped is None else skipped)


@pytest.mark.parametrize("depth", [10, SAME_DEPTH - 10])
def test_nesting_the_reference_handles(depth: int) -> None:
    deep = b"\x91" * depth + b"\x00"
    same(b"\x93\x00\x91" + b"\x91\xa6Future" + deep + b"\x00")
    same(_event(TYPE, HASHES, (pack("x"), deep)))
    same(b"\x92\xa1x" + deep)


def test_nesting_up_to_the_native_limit_decodes() -> None:
    # Below the batch, its events and an event (3 levels), a field of nested arrays.
    field = b"\x91" * (NATIVE_DEPTH - 3) + b"\x00"
    _, _, events, skipped = _dataplane.decode_batch(_event(TYPE, HASHES, (pack("x"), field)))

    assert (len(events), skipped) == (1, {})
    with pytest.raises(ValueError, match="msgpack"):
        _dataplane.decode_batch(_event(TYPE, HASHES, (pack("x"), b"\x91" + field)))


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\x00", b"\xdd\x00\x00\x00\x01", b"\x81\x91"])
def test_nesting_past_the_native_limit_is_msgpack(opener: bytes) -> None:
    deep = opener * 100_000 + b"\x00"
    for payload in (deep, b"\x93\x00\x91" + deep + b"\x00", _event(TYPE, HASHES, (b"\xa1x", deep))):
        with pytest.raises(ValueError, match="msgpack"):
            _dataplane.decode_batch(payload)


def test_huge_counts_fail_at_once() -> None:
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"):
        for payload in (header, b"\x92\x00" + header, _event(TYPE, (pack("block_hashes"), header))):
            assert same(payload + bytes(1000)) == ("error", "msgpack")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 8, 12, 16, 17, 255, 256])
@pytest.mark.parametrize("code", [-1, 0, 5])
def test_ext_values_of_every_size_and_header(code: int, size: int) -> None:
    data = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
    fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    headers = [b"\xc7" + bytes([size]) if size < 256 else b"", b"\xc8" + size.to_bytes(2)]
    headers += [b"\xc9" + size.to_bytes(4), fixed.get(size, b"")]
    for header in filter(None, headers):
        ext = header + code.to_bytes(1, signed=True) + data
        same(_event(TYPE, HASHES, (pack("x"), ext)))
        same(_event(TYPE, HASHES, (pack("extra_keys"), b"\x91\x91" + ext)))
        same(_event(TYPE, HASHES, (pack("block_size"), pack(-1)), (pack("x"), ext)))


def test_timestamps_are_checked_where_the_untyped_decode_reads_them() -> None:
    def entry(seconds: int, nanoseconds: int) -> bytes:
        data = nanoseconds.to_bytes(4) + seconds.to_bytes(8, signed=True)
        return b"\x91\x91\xc7\x0c\xff" + data

    last, first = 253402300799, -62135596800
    cases = [(last, 999999499), (last, 999999500), (first, 0), (first - 1, 0), (0, 10**9)]
    for seconds, nanoseconds in cases:
        same(_event(TYPE, HASHES, (pack("extra_keys"), entry(seconds, nanoseconds))))
    rnd = random.Random(0)
    for data in (bytes(4), bytes(8), (10**9 << 34).to_bytes(8), bytes(3), bytes(16)):
        extra_keys = encode([[Ext(-1, data)]], rnd)
        same(_event(TYPE, HASHES, (pack("extra_keys"), extra_keys)))


def test_a_nan_timestamp_compares_by_its_bits() -> None:
    outcome = same(pack([math.nan, []]))
    assert math.isnan(struct.unpack("<d", outcome[0])[0])
