"""The C loops (service/_native.c) against their Python reference (loops.py, and msgspec
for token ids): same results on the same inputs, and the same refusals of bad ones."""

from __future__ import annotations

from array import array
from typing import Annotated

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from service.index import loops
from service.index.keys import TOKEN_TYPECODE

try:
    from service import _native
except ImportError:  # not built here (no compiler or xxhash.h): nothing to compare
    pytest.skip("service._native is not built", allow_module_level=True)

U64 = st.integers(0, 2**64 - 1)
MASK = 15


def buckets() -> list[dict[int, int]]:
    return [{} for _ in range(MASK + 1)]


def test_the_service_runs_the_native_loops_when_built() -> None:
    assert loops.NATIVE
    assert loops.chain_keys is _native.chain_keys
    assert loops.store_fields is _native.store_fields


@given(data=st.binary(max_size=700), step=st.integers(1, 80), seed=U64)
def test_chain_keys(data: bytes, step: int, seed: int) -> None:
    assert _native.chain_keys(data, step, seed) == loops.py_chain_keys(data, step, seed)


def test_chain_keys_is_xxh3_chained() -> None:
    data = array("I", range(64)).tobytes()
    first = xxhash.xxh3_64_intdigest(data[:64], 7)
    second = xxhash.xxh3_64_intdigest(data[64:128], first)
    assert _native.chain_keys(data, 64, 7)[:2] == [first, second]
    assert _native.chain_keys(data[:100], 64, 7) == [first]  # a partial piece is ignored


@given(
    stored=st.dictionaries(U64, st.integers(1, 2**200), max_size=40),
    probes=st.lists(U64, max_size=40),
)
def test_lookup_values(stored: dict[int, int], probes: list[int]) -> None:
    by_route = buckets()
    for key, value in stored.items():
        by_route[key & MASK][key] = value
    keys = probes + list(stored)
    assert _native.lookup_values(by_route, MASK, keys) == loops.py_lookup_values(
        by_route, MASK, keys
    )


# Several stores into one index, slots up to 12 (fields past bit 64 take the wide-int path).
_STORE = st.tuples(
    st.lists(st.sampled_from([3, 19, 2**63 + 5, 2**64 - 1]) | U64, max_size=20),
    st.integers(0, 12).map(lambda slot: 8 * slot),
    st.sampled_from([2, 4, 8]),
    st.integers(0, 15).map(lambda gen: gen << 4),
)


@settings(max_examples=300)
@given(stores=st.lists(_STORE, min_size=1, max_size=8))
def test_store_fields(stores: list[tuple[list[int], int, int, int]]) -> None:
    native, python = buckets(), buckets()
    for keys, shift, tier_bit, gen_bits in stores:
        got = _native.store_fields(native, MASK, keys, shift, tier_bit, gen_bits)
        want = loops.py_store_fields(python, MASK, keys, shift, tier_bit, gen_bits)
        assert got == want
        assert native == python


@given(
    pairs=st.lists(st.tuples(U64, U64), max_size=40),
    limits=st.lists(st.integers(0, 5), min_size=MASK + 1, max_size=MASK + 1),
)
def test_set_routed(pairs: list[tuple[int, int]], limits: list[int]) -> None:
    keys, values = [k for k, _ in pairs], [v for _, v in pairs]
    native, python = buckets(), buckets()
    over = _native.set_routed(native, limits, MASK, keys, values)
    assert over == loops.py_set_routed(python, limits, MASK, keys, values)
    assert native == python


@pytest.mark.parametrize(
    ("native", "python"),
    [
        (
            lambda: _native.lookup_values(buckets(), 16, [1]),
            lambda: loops.py_lookup_values(buckets(), 16, [1]),
        ),
        (
            lambda: _native.store_fields(buckets(), MASK, [1], 0, 1, 0),
            lambda: loops.py_store_fields(buckets(), MASK, [1], 0, 1, 0),
        ),
        (
            lambda: _native.store_fields(buckets(), MASK, [1], 0, 2, 0x0F),
            lambda: loops.py_store_fields(buckets(), MASK, [1], 0, 2, 0x0F),
        ),
        (
            lambda: _native.set_routed(buckets(), [1] * 16, MASK, [1, 2], [1]),
            lambda: loops.py_set_routed(buckets(), [1] * 16, MASK, [1, 2], [1]),
        ),
        (lambda: _native.chain_keys(b"abcd", 0, 0), lambda: loops.py_chain_keys(b"abcd", 0, 0)),
    ],
)
def test_bad_arguments_are_refused_alike(native: object, python: object) -> None:
    assert callable(native) and callable(python)
    with pytest.raises(ValueError):
        native()
    with pytest.raises(ValueError):
        python()


def test_a_key_that_is_not_an_int_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _native.lookup_values(buckets(), MASK, [1, "2"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _native.store_fields(buckets(), MASK, [1.5], 0, 2, 0)  # type: ignore[list-item]


# --- token ids: msgpack reader against msgspec's typed decode ---------------------------

_TOKEN_IDS = msgspec.msgpack.Decoder(
    tuple[Annotated[int, msgspec.Meta(ge=0, lt=2**32)], ...] | None
)


def _reference_tokens(raw: bytes) -> bytes | None:
    """Packed uint32 as msgspec's typed decode reads the value; None where it refuses. No
    bytes at all stand for an absent field (a map event without token_ids)."""
    if not raw:
        return b""
    try:
        tokens = _TOKEN_IDS.decode(raw)
    except msgspec.DecodeError:
        return None
    return array(TOKEN_TYPECODE, tokens or ()).tobytes()


def _int_forms(value: int) -> list[bytes]:
    """Every msgpack encoding of ``value``, canonical or not (vLLM's msgspec writes the
    shortest; other writers need not)."""
    forms = []
    if 0 <= value <= 0x7F:
        forms.append(bytes([value]))
    if -32 <= value < 0:
        forms.append(bytes([value & 0xFF]))
    for tag, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if 0 <= value < 1 << (8 * width):
            forms.append(bytes([tag]) + value.to_bytes(width, "big"))
    for tag, width in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        if -(1 << (8 * width - 1)) <= value < 1 << (8 * width - 1):
            forms.append(bytes([tag]) + value.to_bytes(width, "big", signed=True))
    return forms


_ELEMENT = st.integers(-(2**63), 2**64 - 1).flatmap(lambda v: st.sampled_from(_int_forms(v))) | (
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3", b"\xca\x00\x00\x00\x00", b"\xa1x", b"\x90"])
)


@st.composite
def _token_arrays(draw: st.DrawFn) -> bytes:
    elements = draw(st.lists(_ELEMENT, max_size=20))
    count = len(elements) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    count = max(count, 0)
    header = draw(
        st.sampled_from(
            [
                bytes([0x90 | count]) if count < 16 else b"\xdc" + count.to_bytes(2, "big"),
                b"\xdc" + count.to_bytes(2, "big"),
                b"\xdd" + count.to_bytes(4, "big"),
            ]
        )
    )
    return header + b"".join(elements) + draw(st.sampled_from([b"", b"", b"\x01"]))


@settings(max_examples=500)
@given(raw=_token_arrays() | st.binary(max_size=12) | st.just(b"\xc0"))
def test_unpack_tokens_reads_what_msgspec_reads(raw: bytes) -> None:
    want = _reference_tokens(raw)
    if want is None:
        with pytest.raises(ValueError):
            _native.unpack_tokens(raw)
    else:
        assert _native.unpack_tokens(raw) == want


def test_unpack_tokens_edges() -> None:
    top = msgspec.msgpack.encode([0, 127, 128, 2**16, 2**32 - 1])
    assert array(TOKEN_TYPECODE, [0, 127, 128, 2**16, 2**32 - 1]).tobytes() == (
        _native.unpack_tokens(top)
    )
    assert _native.unpack_tokens(b"") == b""  # a map event without the field
    for bad in (msgspec.msgpack.encode([2**32]), msgspec.msgpack.encode([-1]), b"\x92\x01"):
        with pytest.raises(ValueError):
            _native.unpack_tokens(bad)


# A value packs one 8-bit field per slot: held bit, tier bits, generation bits.
_FIELD_VALUE = st.integers(0, 255)


@st.composite
def _packed_values(draw: st.DrawFn) -> list[int]:
    slots = draw(st.integers(1, 12))
    rows = draw(st.lists(st.lists(_FIELD_VALUE, min_size=slots, max_size=slots), max_size=30))
    return [sum(field << (8 * slot) for slot, field in enumerate(row)) for row in rows]


@settings(max_examples=300)
@given(values=_packed_values(), slots=st.lists(st.integers(0, 13), max_size=6))
def test_summarize(values: list[int], slots: list[int]) -> None:
    assert _native.summarize(values, slots) == loops.py_summarize(values, slots)


def test_summarize_reads_fields_past_64_bits() -> None:
    held_gpu, held_cpu = 0x01 | 0x02, 0x01 | 0x04
    values = [held_gpu << 80 | held_gpu, held_cpu << 80, held_gpu << 80 | held_gpu]
    assert _native.summarize(values, [10, 0]) == [
        (3, 3, {1: 2, 2: 1}),
        (1, 2, {1: 1}),
    ]
