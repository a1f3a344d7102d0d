"""The C loops (service/index/_native.c) against their Python reference (loops.py): same
results on the same inputs, and the same refusals of bad ones."""

from __future__ import annotations

from array import array

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from service.index import loops

try:
    from service.index import _native
except ImportError:  # not built here (no compiler or xxhash.h): nothing to compare
    pytest.skip("service.index._native is not built", allow_module_level=True)

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
