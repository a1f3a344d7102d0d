"""decode_batch against every wire shape vLLM publishes, malformed events, and fuzzing."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.events.model import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    Tier,
)
from service.events.vllm import (
    BATCH_ERROR_REASONS,
    EVENT_SKIP_REASONS,
    DecodeError,
    decode_batch,
)
from tests.support.vllm_wire import (
    VERSIONS,
    Envelope,
    HashStyle,
    Version,
    WireEvent,
    WireRemoved,
    WireStored,
    cleared,
    encode_batch,
    encode_event,
    pack,
    raw,
    removed,
    stored,
)

U64 = (1 << 64) - 1
H1, H2, H3 = 0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210, 0x8000_0000_0000_0000
TOKENS = tuple(range(1000, 1032))
SALT_KEYS: tuple[tuple[object, ...] | None, ...] = (("salt-1",), None)


def test_token_ids_decode_to_the_ints_sent() -> None:
    # Pure Python: the native data plane decodes on its own (its differential tests).
    for version in ("0.9", "0.23", "0.33"):
        payload = encode_batch([stored([H1, H2], TOKENS, block_size=16)], version=version)
        (event,) = decode_batch(payload).events
        assert isinstance(event, BlockStored)
        assert event.token_ids == TOKENS


def _skip_counts(payload: bytes) -> dict[str, int]:
    return decode_batch(payload).skipped


def _one_event(payload: bytes) -> Event:
    batch = decode_batch(payload)
    assert batch.skipped == {}
    assert len(batch.events) == 1
    return batch.events[0]


# --- every release's shape ------------------------------------------------------------------


def _sample_events() -> list[WireEvent]:
    return [
        stored(
            [H1, H2],
            TOKENS,
            block_size=16,
            parent=H3,
            medium="CPU",
            lora_name="adapter",
            lora_id=7,
            extra_keys=SALT_KEYS,
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ),
        removed([H2], medium="CPU", group_idx=0),
        cleared(),
    ]


# What each release can say about _sample_events(): older ones lack later fields.
_HAS_MEDIUM = {v: v != "0.9" for v in VERSIONS}
_HAS_LORA_NAME = {v: v not in ("0.9", "0.10.2") for v in VERSIONS}
_HAS_EXTRA_KEYS = {v: v not in ("0.9", "0.10.2", "0.14") for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("hash_style", ["uint", "int", "bytes"])
def test_each_release_decodes_to_the_same_events(version: Version, hash_style: HashStyle) -> None:
    payload = encode_batch(
        _sample_events(), ts=12.5, dp_rank=1, version=version, hash_style=hash_style
    )

    batch = decode_batch(payload)

    tier = Tier.CPU if _HAS_MEDIUM[version] else Tier.GPU
    assert batch.events == (
        BlockStored(
            block_hashes=(H1, H2),
            parent_block_hash=H3,
            token_ids=TOKENS,
            block_size=16,
            tier=tier,
            lora_name="adapter" if _HAS_LORA_NAME[version] else None,
            lora_id=7,
            extra_keys=SALT_KEYS if _HAS_EXTRA_KEYS[version] else None,
        ),
        BlockRemoved((H2,), tier),
        AllBlocksCleared(),
    )
    assert batch.ts == 12.5
    assert batch.data_parallel_rank == (None if version == "0.9" else 1)
    assert batch.skipped == {}


def test_literal_vllm_0_9_payload_decodes() -> None:
    # Literal bytes as vLLM 0.9 sent them, independent of the test encoder.
    payload = msgpack.packb(
        [3.0, [["BlockStored", [H1], None, [5] * 16, 16, None], ["BlockRemoved", [H1]]]]
    )

    batch = decode_batch(payload)

    assert batch.events == (
        BlockStored((H1,), None, (5,) * 16, 16),
        BlockRemoved((H1,)),
    )
    assert batch.data_parallel_rank is None


def test_array_event_tolerates_trailing_future_fields() -> None:
    event = encode_event(stored([H1], TOKENS[:16], medium="GPU"), version="0.23")
    assert isinstance(event, list)
    payload = pack([1.0, [[*event, "future", {"x": 1}], ["AllBlocksCleared", 1, 2]], 0])

    batch = decode_batch(payload)

    assert batch.events == (BlockStored((H1,), None, TOKENS[:16], 16), AllBlocksCleared())


def test_map_event_ignores_unknown_fields_and_needs_only_block_hashes() -> None:
    payload = pack(
        [
            1.0,
            [
                {"type": "BlockStored", "block_hashes": [H1], "locality": {"rack": 3}},
                {"type": "BlockRemoved", "block_hashes": [H1], "ownership": "x"},
            ],
            None,
        ]
    )

    batch = decode_batch(payload)

    assert batch.events == (BlockStored((H1,), None, (), 0), BlockRemoved((H1,)))


def test_0_33_map_events_with_newer_fields_decode() -> None:
    payload = encode_batch([stored([H1], TOKENS[:16], medium="GPU")], version="0.33")
    assert b"lookahead_token_ids" in payload

    assert _one_event(payload) == BlockStored((H1,), None, TOKENS[:16], 16)


@pytest.mark.parametrize("version", ["0.23", "0.24"])
def test_bytes_match_what_vllm_msgspec_structs_write(version: Version) -> None:
    """The test encoder writes what vLLM's own Struct definitions write."""
    array_like = version == "0.23"

    class KVCacheEvent(
        msgspec.Struct, tag=True, array_like=array_like, omit_defaults=True, gc=False
    ):
        pass

    class VllmBlockStored(KVCacheEvent, tag="BlockStored"):
        block_hashes: list[int | bytes]
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class VllmBlockRemoved(KVCacheEvent, tag="BlockRemoved"):
        block_hashes: list[int | bytes]
        medium: str | None
        group_idx: int | None = None

    class VllmAllBlocksCleared(KVCacheEvent, tag="AllBlocksCleared"):
        pass

    class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    vllm_bytes = msgspec.msgpack.encode(
        VllmEventBatch(
            2.0,
            [
                VllmBlockStored([H1, H2], H3, [*TOKENS], 16, None, "GPU", None, [*SALT_KEYS]),
                VllmBlockRemoved([H2], None),
                VllmAllBlocksCleared(),
            ],
            0,
        )
    )
    ours = encode_batch(
        [
            stored([H1, H2], TOKENS, parent=H3, medium="GPU", extra_keys=SALT_KEYS),
            removed([H2]),
            cleared(),
        ],
        ts=2.0,
        version=version,
    )

    assert ours == vllm_bytes
    assert decode_batch(vllm_bytes).events[0] == BlockStored(
        (H1, H2), H3, TOKENS, 16, extra_keys=SALT_KEYS
    )


# --- batch envelope ---------------------------------------------------------------------


def test_map_batch_envelope() -> None:
    events: list[WireEvent] = [stored([H1], TOKENS[:16]), cleared()]
    for version in ("0.23", "0.24"):
        payload = encode_batch(events, ts=4.0, dp_rank=2, version=version, envelope="map")

        batch = decode_batch(payload)

        assert batch.events == (BlockStored((H1,), None, TOKENS[:16], 16), AllBlocksCleared())
        assert (batch.ts, batch.data_parallel_rank) == (4.0, 2)


def test_two_element_batch_and_null_rank_have_no_rank() -> None:
    assert decode_batch(pack([1, []])) == EventBatch(1.0, (), None, {})
    assert decode_batch(pack([1.0, [], None])).data_parallel_rank is None
    assert decode_batch(pack({"ts": 1.0, "events": []})).data_parallel_rank is None


def test_batch_tolerates_trailing_elements_and_unknown_keys() -> None:
    assert decode_batch(pack([1.0, [], 3, "later"])).data_parallel_rank == 3
    assert decode_batch(pack({"ts": 1.0, "events": [], "x": 1})).events == ()


def test_event_forms_may_differ_from_the_envelope_form() -> None:
    map_event = encode_event(stored([H1]), version="0.24")
    array_event = encode_event(stored([H1]), version="0.23")
    expected = (BlockStored((H1,), None, (), 16),)

    assert decode_batch(pack([1.0, [map_event], 0])).events == expected
    assert decode_batch(pack({"ts": 1.0, "events": [array_event]})).events == expected
    # Both forms in one batch: not something vLLM sends, but each event stands alone.
    assert decode_batch(pack([1.0, [map_event, array_event], 0])).events == expected * 2


@pytest.mark.parametrize("version", ["0.23", "0.24"])
@pytest.mark.parametrize("count", [15, 16, 300])
def test_batches_of_many_events(version: Version, count: int) -> None:
    # 16 and more events take a longer array header than 15 (fixarray).
    events: list[WireEvent] = [removed([i], medium="CPU") for i in range(count)]

    batch = decode_batch(encode_batch(events, version=version))

    assert batch.events == tuple(BlockRemoved((i,), Tier.CPU) for i in range(count))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x93\x01",
        b"\x92\x01\x90\x00",
        b"not msgpack at all \xc1",
        b"\xdd\xff\xff\xff\xff",
        b"\x91" * 100_000 + b"\x00",
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing-bytes", "text", "huge-array", "deep"],
)
def test_undecodable_bytes_raise_msgpack(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode_batch(payload)
    assert info.value.reason == "msgpack"


@pytest.mark.parametrize(
    "batch",
    [
        5,
        "batch",
        [],
        [1.0],
        ["ts", []],
        [True, []],
        [1.0, "events"],
        [1.0, {"a": 1}],
        [1.0, [], -1],
        [1.0, [], "0"],
        {"events": []},
        {"ts": 1.0},
        {"ts": 1.0, "events": [], "data_parallel_rank": 1.5},
    ],
)
def test_msgpack_that_is_not_a_batch_raises_batch_shape(batch: object) -> None:
    with pytest.raises(DecodeError) as info:
        decode_batch(pack(batch))
    assert info.value.reason == "batch_shape"


# --- hashes -----------------------------------------------------------------------------


def test_signed_and_bytes_hashes_normalise_to_unsigned() -> None:
    digest = bytes(range(24)) + H2.to_bytes(8, "big")
    payload = pack([1.0, [["BlockRemoved", [-1, H2 - (1 << 64), digest, 0, U64], None]], 0])

    assert _one_event(payload) == BlockRemoved((U64, H2, H2, 0, U64))


def test_parent_hash_is_normalised_too() -> None:
    payload = pack([1.0, [["BlockStored", [H1], -2, [], 16, None]], 0])

    event = _one_event(payload)

    assert isinstance(event, BlockStored)
    assert event.parent_block_hash == U64 - 1


@pytest.mark.parametrize(
    "hashes",
    [[1.5], ["123"], [b"short"], [None], [[1]], [H1, True], "not-a-list", None, {"h": 1}],
)
def test_bad_block_hashes_skip_the_event_as_bad_hash(hashes: object) -> None:
    payload = pack([1.0, [["BlockRemoved", hashes, None], ["BlockRemoved", [H1], None]], 0])

    batch = decode_batch(payload)

    assert batch.events == (BlockRemoved((H1,)),)
    assert batch.skipped == {"bad_hash": 1}


@pytest.mark.parametrize("parent", [1.5, "p", b"1234567", [H1]])
def test_bad_parent_hash_is_bad_hash(parent: object) -> None:
    event = {"type": "BlockStored", "block_hashes": [H1], "parent_block_hash": parent}
    payload = pack({"ts": 1.0, "events": [event]})

    assert _skip_counts(payload) == {"bad_hash": 1}


def test_eight_byte_hash_is_accepted() -> None:
    payload = pack([1.0, [["BlockRemoved", [H1.to_bytes(8, "big")]]], 0])

    assert _one_event(payload) == BlockRemoved((H1,))


# --- fields -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        (None, Tier.GPU),
        ("GPU", Tier.GPU),
        ("gpu", Tier.GPU),
        ("CPU", Tier.CPU),
        ("cpu", Tier.CPU),
        ("DISK", Tier.DISK),
        ("Disk", Tier.DISK),
        ("STORAGE", Tier.DISK),
        ("storage", Tier.DISK),
    ],
)
def test_medium_maps_to_tier(medium: str | None, tier: Tier) -> None:
    payload = encode_batch(
        [stored([H1], medium=medium), removed([H1], medium=medium)], version="0.24"
    )

    assert decode_batch(payload).events == (
        BlockStored((H1,), None, (), 16, tier),
        BlockRemoved((H1,), tier),
    )


def test_unknown_medium_is_skipped_and_counted_apart() -> None:
    payload = encode_batch(
        [stored([H1], medium="NVME"), removed([H1], medium="remote"), removed([H2])]
    )

    batch = decode_batch(payload)

    assert batch.events == (BlockRemoved((H2,)),)
    assert batch.skipped == {"unknown_medium": 2}


def test_offload_event_without_tokens_keeps_its_hashes() -> None:
    payload = encode_batch([stored([H1, H2], (), block_size=0, medium="CPU")])

    assert _one_event(payload) == BlockStored((H1, H2), None, (), 0, Tier.CPU)


def test_lora_and_cache_salt_are_kept() -> None:
    payload = encode_batch(
        [stored([H1, H2], TOKENS, lora_name="sql", lora_id=3, extra_keys=SALT_KEYS)],
        version="0.20",
    )

    event = _one_event(payload)

    assert isinstance(event, BlockStored)
    assert (event.lora_name, event.lora_id) == ("sql", 3)
    assert event.extra_keys == (("salt-1",), None)


_GOOD_STORED: dict[str, object] = {
    "type": "BlockStored",
    "block_hashes": [H1, H2],
    "token_ids": list(TOKENS),
    "block_size": 16,
}


@pytest.mark.parametrize(
    "change",
    [
        {"token_ids": [*TOKENS[:-1], 1 << 32]},
        {"token_ids": [*TOKENS[:-1], -1]},
        {"token_ids": [*TOKENS[:-1], 1.0]},
        {"token_ids": [*TOKENS[:-1], True]},
        {"token_ids": [*TOKENS[:-1]]},
        {"token_ids": "tokens"},
        {"block_size": -16},
        {"block_size": 16.0},
        {"block_size": None},
        {"block_size": 8},
        {"lora_id": "7"},
        {"lora_name": 7},
        {"medium": 1},
        {"extra_keys": [None]},
        {"extra_keys": [None, None, None]},
        {"extra_keys": ["salt", None]},
        {"extra_keys": "salt"},
    ],
    ids=repr,
)
def test_bad_field_skips_only_that_event(change: dict[str, object]) -> None:
    bad = {**_GOOD_STORED, **change}
    payload = pack([1.0, [_GOOD_STORED, bad, _GOOD_STORED], 0])

    batch = decode_batch(payload)

    good = BlockStored((H1, H2), None, TOKENS, 16)
    assert batch.events == (good, good)
    assert batch.skipped == {"bad_field": 1}


def test_highest_token_id_is_accepted() -> None:
    tokens = [(1 << 32) - 1] * 16
    payload = encode_batch([stored([H1], tokens)])

    assert _one_event(payload) == BlockStored((H1,), None, tuple(tokens), 16)


# --- bad events among good ones ---------------------------------------------------------


def test_mixed_batch_keeps_good_events_in_order_and_counts_bad_ones() -> None:
    payload = encode_batch(
        [
            stored([H1], TOKENS[:16]),
            raw(["BlockStored", [1.5], None, [], 16, None]),
            raw(["BlockUpdated", [H1]]),
            raw({"type": "SessionEnded", "session_id": "s"}),
            removed([H1]),
            raw(["BlockStored", [H1], None]),
            raw(42),
            raw([]),
            raw([7, [H1]]),
            raw({"block_hashes": [H1]}),
            raw(["BlockRemoved", [H2], "NVME"]),
            raw(["BlockStored", [H1], None, [1, 2, 3], 16, None]),
            cleared(),
        ]
    )

    batch = decode_batch(payload)

    assert batch.events == (
        BlockStored((H1,), None, TOKENS[:16], 16),
        BlockRemoved((H1,)),
        AllBlocksCleared(),
    )
    assert batch.skipped == {
        "bad_hash": 1,
        "unknown_type": 2,
        "event_shape": 5,
        "unknown_medium": 1,
        "bad_field": 1,
    }


def test_event_with_undecodable_bytes_is_skipped_alone() -> None:
    # [1.0, [[<str with invalid UTF-8>], ["AllBlocksCleared"]], 0], built by hand.
    bad_event = b"\x91\xa1\xff"
    payload = b"\x93" + pack(1.0) + b"\x92" + bad_event + pack(["AllBlocksCleared"]) + b"\x00"

    batch = decode_batch(payload)

    assert batch.events == (AllBlocksCleared(),)
    assert batch.skipped == {"event_shape": 1}


# --- properties -------------------------------------------------------------------------

# Releases whose events carry every field the domain events have.
_PROPERTY_VERSIONS: tuple[Version, ...] = ("0.23", "0.24", "0.33")
_hash64 = st.integers(0, U64)
_medium = st.sampled_from([None, "GPU", "cpu", "DISK", "storage"])
_TIER_OF = {
    None: Tier.GPU,
    "GPU": Tier.GPU,
    "CPU": Tier.CPU,
    "DISK": Tier.DISK,
    "STORAGE": Tier.DISK,
}


@st.composite
def _wire_stored(draw: st.DrawFn) -> WireStored:
    n = draw(st.integers(0, 4))
    block_size = draw(st.integers(1, 4))
    with_tokens = draw(st.booleans())
    tokens = draw(
        st.lists(st.integers(0, (1 << 32) - 1), min_size=n * block_size, max_size=n * block_size)
        if with_tokens
        else st.just([])
    )
    extra = st.lists(st.none() | st.tuples(st.text(max_size=4)), min_size=n, max_size=n)
    return stored(
        draw(st.lists(_hash64, min_size=n, max_size=n)),
        tokens,
        block_size=block_size,
        parent=draw(st.none() | _hash64),
        medium=draw(_medium),
        lora_name=draw(st.none() | st.text(max_size=6)),
        lora_id=draw(st.none() | st.integers(0, 1000)),
        extra_keys=draw(st.none() | extra),
    )


_wire_removed = st.builds(
    lambda hashes, medium: removed(hashes, medium=medium),
    st.lists(_hash64, max_size=4),
    _medium,
)
_wire_event = _wire_stored() | _wire_removed | st.just(cleared())


def _expected(event: WireEvent) -> Event:
    if isinstance(event, WireStored):
        return BlockStored(
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            _TIER_OF[None if event.medium is None else event.medium.upper()],
            event.lora_name,
            event.lora_id,
            event.extra_keys,
        )
    if isinstance(event, WireRemoved):
        tier = _TIER_OF[None if event.medium is None else event.medium.upper()]
        return BlockRemoved(event.block_hashes, tier)
    return AllBlocksCleared()


@given(
    events=st.lists(_wire_event, max_size=5),
    version=st.sampled_from(_PROPERTY_VERSIONS),
    hash_style=st.sampled_from(["uint", "int", "bytes"]),
    envelope=st.sampled_from(["array", "map"]),
)
def test_round_trip(
    events: list[WireEvent], version: Version, hash_style: HashStyle, envelope: Envelope
) -> None:
    payload = encode_batch(events, version=version, hash_style=hash_style, envelope=envelope)

    batch = decode_batch(payload)

    assert batch.events == tuple(_expected(e) for e in events)
    assert batch.skipped == {}


_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats()
    | st.binary(max_size=40)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "type"])
    | st.text(max_size=6)
)
_key = st.sampled_from([*_GOOD_STORED, "medium", "extra_keys", "parent_block_hash"])
_object = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(_key | st.text(max_size=4) | st.integers(-5, 5), inner, max_size=6)
    ),
    max_leaves=40,
)


def _check_decodes_or_raises_decode_error(payload: bytes) -> EventBatch | None:
    try:
        batch = decode_batch(payload)
    except DecodeError as exc:
        assert exc.reason in BATCH_ERROR_REASONS
        return None
    assert set(batch.skipped) <= set(EVENT_SKIP_REASONS)
    return batch


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_decode_error(payload: bytes) -> None:
    _check_decodes_or_raises_decode_error(payload)


@given(_object)
def test_random_msgpack_values_decode_or_raise_decode_error(value: object) -> None:
    _check_decodes_or_raises_decode_error(pack(value))


@given(
    ts=st.floats() | st.integers(-(1 << 63), U64),
    events=st.lists(_object, max_size=6),
    rank=st.none() | st.integers(-5, 5),
)
def test_random_events_in_a_batch_are_decoded_or_skipped_one_by_one(
    ts: float, events: list[object], rank: int | None
) -> None:
    batch = _check_decodes_or_raises_decode_error(pack([ts, events, rank]))

    if batch is not None:
        assert len(batch.events) + sum(batch.skipped.values()) == len(events)


@st.composite
def _mutated_event(draw: st.DrawFn) -> object:
    """A real event with one field, or the tag, replaced by an arbitrary value."""
    version = draw(st.sampled_from(_PROPERTY_VERSIONS))
    encoded = encode_event(draw(_wire_event), version=version)
    value = draw(_object)
    if isinstance(encoded, list):
        encoded[draw(st.integers(0, len(encoded) - 1))] = value
    else:
        assert isinstance(encoded, dict)
        encoded[draw(st.sampled_from(sorted(encoded)))] = value
    return encoded


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(before=_wire_event, mutated=_mutated_event(), after=_wire_event)
def test_a_broken_event_never_affects_its_neighbours(
    before: WireEvent, mutated: object, after: WireEvent
) -> None:
    payload = encode_batch([before, raw(mutated), after])

    batch = decode_batch(payload)

    assert batch.events[0] == _expected(before)
    assert batch.events[-1] == _expected(after)
    assert len(batch.events) + sum(batch.skipped.values()) == 3
    assert set(batch.skipped) <= set(EVENT_SKIP_REASONS)


@given(event=_mutated_event() | _wire_event.map(encode_event))
def test_an_event_decodes_the_same_alone_and_next_to_a_broken_one(event: object) -> None:
    """Alone, a batch takes the typed fast path; a broken neighbour forces the per-event path."""
    alone = decode_batch(pack([1.0, [event], 0]))
    beside_broken = decode_batch(pack([1.0, [event, ["BlockRemoved", "broken"]], 0]))

    assert beside_broken.events == alone.events
    expected_skips = dict(alone.skipped)
    expected_skips["bad_hash"] = expected_skips.get("bad_hash", 0) + 1
    assert beside_broken.skipped == expected_skips
