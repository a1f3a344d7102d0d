"""Decode vLLM's KV-cache event batches (msgpack) into domain events.

One function, :func:`decode_batch`, covers every wire shape vLLM 0.9 to 0.33 publishes:

- the batch as an array ``[ts, events]`` / ``[ts, events, data_parallel_rank]`` (extra
  trailing elements ignored) or as a map ``{ts, events, data_parallel_rank}``;
- events as tagged arrays (vLLM <= 0.23), where older releases stop earlier and newer ones
  add trailing fields (ignored), or as maps tagged by ``"type"`` (vLLM >= 0.24), where fields
  with a default may be left out and unknown fields are ignored.

What a batch must be, or :class:`DecodeError` is raised (``reason``):

- ``msgpack``: the bytes are not one well-formed msgpack value;
- ``batch_shape``: well-formed msgpack that is not a batch: not an array of at least two or a
  map; ``ts`` not a number; ``events`` not an array; ``data_parallel_rank`` neither null nor
  an int >= 0.

A bad event never fails its batch: it is skipped and counted in ``EventBatch.skipped`` by
reason:

- ``unknown_type``: the tag is a string this decoder does not know (a newer vLLM's event);
- ``event_shape``: not a tagged array or map, the tag is not a string, a required field is
  missing (array form: up to ``block_size`` for ``BlockStored``, ``block_hashes`` for
  ``BlockRemoved``; map form: ``block_hashes``), or the event's bytes do not decode;
- ``bad_hash``: ``block_hashes`` is not an array of hashes, or ``parent_block_hash`` is
  neither null nor a hash;
- ``bad_field``: any other field has the wrong type or range; token ids outside
  ``[0, 2**32)``; ``block_size`` < 0; ``token_ids`` non-empty but not
  ``len(block_hashes) * block_size`` long; ``extra_keys`` not one entry (array or null) per
  block;
- ``unknown_medium``: ``medium`` is a string naming no tier we know. Kept apart from
  ``bad_field`` because it means a newer or third-party offload tier, not a broken producer:
  guessing its weight would skew scores, so such events are dropped and made visible.

Hashes: an unsigned or signed 64-bit int (signed ones are taken as two's complement), or raw
digest bytes (the last 8 bytes, big-endian, which is what vLLM publishes as an int). Bytes
shorter than 8 are ``bad_hash``: vLLM's digests are 32 bytes, and a short value could not be
matched against the int form of the same block. ``medium``: null or ``GPU`` is
:attr:`Tier.GPU`, ``CPU`` is :attr:`Tier.CPU`, ``DISK`` or ``STORAGE`` is :attr:`Tier.DISK`,
case-insensitive. Fields the domain events do not carry (``group_idx``,
``kv_cache_spec_*``, ...) are not validated.

How: msgspec typed Structs decode and validate a whole batch in C (see
docs/performance.md for the measurements behind this choice). When that fails, the batch is
decoded again with each event left raw, each event is decoded alone the same way, and only an
event that still fails goes through a plain-Python check whose sole job is to name the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar, cast

import msgspec

from service.events.model import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
    EventBatch,
    Tier,
)

__all__ = [
    "BATCH_ERROR_REASONS",
    "EVENT_SKIP_REASONS",
    "DecodeError",
    "decode_batch",
]

BATCH_ERROR_REASONS: tuple[str, ...] = ("msgpack", "batch_shape")
"""Every ``DecodeError.reason``, e.g. to pre-register metric labels."""

EVENT_SKIP_REASONS: tuple[str, ...] = (
    "unknown_type",
    "event_shape",
    "bad_hash",
    "bad_field",
    "unknown_medium",
)
"""Every key :func:`decode_batch` may count in ``EventBatch.skipped``."""


class DecodeError(Exception):
    """A payload that is not a vLLM event batch; ``reason`` is one of BATCH_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Skip(Exception):
    """One event to skip, with the reason it is counted under."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_INT64_MIN = -(1 << 63)
_TOKEN_LIMIT = 1 << 32

# msgspec lets a few plain Python errors through on hostile input (deep nesting, invalid
# UTF-8 in a string, an invalid timestamp extension).
_UNDECODABLE = (msgspec.DecodeError, ValueError, RecursionError)

_TIERS: dict[str | None, Tier] = {
    None: Tier.GPU,
    "GPU": Tier.GPU,
    "CPU": Tier.CPU,
    "DISK": Tier.DISK,
    "STORAGE": Tier.DISK,
}

_CLEARED = AllBlocksCleared()


# --- normalisation shared by both paths -------------------------------------------------


def _tier(medium: str | None) -> Tier:
    tier = _TIERS.get(medium)
    if tier is None:
        tier = _TIERS.get(medium.upper()) if medium is not None else None
        if tier is None:
            raise _Skip("unknown_medium")
    return tier


def _hash(value: int | bytes) -> EngineHash:
    if isinstance(value, int):
        return value & _MASK64
    return int.from_bytes(value[-8:], "big")


def _hashes(values: tuple[int | bytes, ...]) -> tuple[EngineHash, ...]:
    """Normalise hashes already validated as ints (64-bit) or bytes of length >= 8."""
    try:
        # The common case, all unsigned ints, costs one C-level pass and no copy. Bytes make
        # min() or the comparison raise TypeError; no hashes at all, ValueError. (No cast():
        # its call alone costs as much as the min() of one hash.)
        if min(values) >= 0:  # type: ignore[operator]
            return values  # type: ignore[return-value]
    except (TypeError, ValueError):
        pass
    # Inline rather than map(_hash, ...): a Python call per hash doubles the cost.
    return tuple(
        [h & _MASK64 if isinstance(h, int) else int.from_bytes(h[-8:], "big") for h in values]
    )


def _stored(
    hashes: tuple[EngineHash, ...],
    parent: EngineHash | None,
    token_ids: Sequence[int],
    block_size: int,
    lora_id: int | None,
    medium: str | None,
    lora_name: str | None,
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None,
) -> BlockStored:
    """The checks across fields, then the event (positional: measurably faster)."""
    if token_ids and len(token_ids) != len(hashes) * block_size:
        raise _Skip("bad_field")
    if extra_keys is not None and len(extra_keys) != len(hashes):
        raise _Skip("bad_field")
    tier = _TIERS.get(medium)
    if tier is None:
        tier = _tier(medium)
    return BlockStored(hashes, parent, token_ids, block_size, tier, lora_name, lora_id, extra_keys)


# --- typed fast path ----------------------------------------------------------------------

_NO_TOKENS = msgspec.Raw(b"")

_Hash = int | Annotated[bytes, msgspec.Meta(min_length=8)]
_Token = Annotated[int, msgspec.Meta(ge=0, lt=_TOKEN_LIMIT)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_ExtraKeys = list[tuple[Any, ...] | None] | None


# gc=False: decoded values hold no reference cycles, and untracked objects decode faster.
class _ArrayStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
    block_hashes: tuple[_Hash, ...]
    parent_block_hash: _Hash | None
    token_ids: msgspec.Raw  # nil or uint32 ints: read by _tokens
    block_size: _NonNegative
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None

    def to_event(self) -> Event:
        return _typed_stored(self)


class _ArrayRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: tuple[_Hash, ...]
    medium: str | None = None

    def to_event(self) -> Event:
        return BlockRemoved(_hashes(self.block_hashes), _tier(self.medium))


class _ArrayCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):
    def to_event(self) -> Event:
        return _CLEARED


class _MapStored(msgspec.Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: tuple[_Hash, ...]
    parent_block_hash: _Hash | None = None
    token_ids: msgspec.Raw = _NO_TOKENS  # nil or uint32 ints: read by _tokens
    block_size: _NonNegative = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None

    def to_event(self) -> Event:
        return _typed_stored(self)


class _MapRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: tuple[_Hash, ...]
    medium: str | None = None

    def to_event(self) -> Event:
        return BlockRemoved(_hashes(self.block_hashes), _tier(self.medium))


class _MapCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    def to_event(self) -> Event:
        return _CLEARED


def _typed_stored(event: _ArrayStored | _MapStored) -> BlockStored:
    parent = event.parent_block_hash
    extra_keys = event.extra_keys
    return _stored(
        _hashes(event.block_hashes),
        None if parent is None else _hash(parent),
        _tokens(event.token_ids),
        event.block_size,
        event.lora_id,
        event.medium,
        event.lora_name,
        None if extra_keys is None else tuple(extra_keys),
    )


_TOKENS = msgspec.msgpack.Decoder(tuple[_Token, ...] | None)


def _tokens(raw: msgspec.Raw) -> Sequence[int]:
    if not raw:
        return ()
    try:
        return _TOKENS.decode(raw) or ()
    except _UNDECODABLE:
        raise _Skip("bad_field") from None


_ArrayEvent = _ArrayStored | _ArrayRemoved | _ArrayCleared
_MapEvent = _MapStored | _MapRemoved | _MapCleared
_TypedEvent = _ArrayEvent | _MapEvent

_E = TypeVar("_E")


class _ArrayBatch(msgspec.Struct, Generic[_E], array_like=True, gc=False):
    ts: float
    events: list[_E]
    data_parallel_rank: _NonNegative | None = None


class _MapBatch(msgspec.Struct, Generic[_E], gc=False):
    ts: float
    events: list[_E]
    data_parallel_rank: _NonNegative | None = None


_Batch = _ArrayBatch[_E] | _MapBatch[_E]

# msgspec cannot mix array-like and map-like Structs in one union, so each event form gets
# its own decoder. Keyed by (batch is a map, events are maps): the decoder to try first, then
# the other event form.
_ARRAY_OF_ARRAYS = msgspec.msgpack.Decoder(_ArrayBatch[_ArrayEvent])
_ARRAY_OF_MAPS = msgspec.msgpack.Decoder(_ArrayBatch[_MapEvent])
_MAP_OF_ARRAYS = msgspec.msgpack.Decoder(_MapBatch[_ArrayEvent])
_MAP_OF_MAPS = msgspec.msgpack.Decoder(_MapBatch[_MapEvent])
_TYPED_BATCH: dict[tuple[bool, bool], tuple[msgspec.msgpack.Decoder[Any], ...]] = {
    (False, False): (_ARRAY_OF_ARRAYS, _ARRAY_OF_MAPS),
    (False, True): (_ARRAY_OF_MAPS, _ARRAY_OF_ARRAYS),
    (True, False): (_MAP_OF_ARRAYS, _MAP_OF_MAPS),
    (True, True): (_MAP_OF_MAPS, _MAP_OF_ARRAYS),
}
_RAW_BATCH: dict[bool, msgspec.msgpack.Decoder[Any]] = {
    False: msgspec.msgpack.Decoder(_ArrayBatch[msgspec.Raw]),
    True: msgspec.msgpack.Decoder(_MapBatch[msgspec.Raw]),
}
_TYPED_EVENT: dict[bool, msgspec.msgpack.Decoder[Any]] = {
    False: msgspec.msgpack.Decoder(_ArrayEvent),
    True: msgspec.msgpack.Decoder(_MapEvent),
}
_ANY = msgspec.msgpack.Decoder()


def _is_map_header(first: int) -> bool:
    """Whether a msgpack value starting with this byte is a map (fixmap, map16, map32)."""
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


def _starts_map(raw: msgspec.Raw) -> bool:
    view = memoryview(raw)
    return bool(view) and _is_map_header(view[0])


def _typed_decoders(payload: bytes) -> tuple[bool, tuple[msgspec.msgpack.Decoder[Any], ...]]:
    """Whether the batch is a map, and the typed decoders to try, likeliest first.

    The event form is guessed from the fixed layout of vLLM's array batch, without decoding:
    a fixarray, a float64 ts, then the events' array header, so the first event starts at
    byte 11, 13 or 15. A wrong guess (any other layout) costs one failed attempt (~0.8 us,
    measured), never a wrong result.
    """
    first = payload[0] if payload else 0
    if _is_map_header(first):
        return True, _TYPED_BATCH[True, True]
    events_are_maps = False
    if 0x90 <= first <= 0x9F and len(payload) > 15 and payload[1] == 0xCB:
        header = payload[10]
        if 0x90 <= header <= 0x9F:
            events_are_maps = _is_map_header(payload[11])
        elif header == 0xDC:
            events_are_maps = _is_map_header(payload[13])
        elif header == 0xDD:
            events_are_maps = _is_map_header(payload[15])
    return False, _TYPED_BATCH[False, events_are_maps]


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one published payload into an :class:`EventBatch`.

    Raises :class:`DecodeError` (and nothing else, whatever the bytes) when the payload is
    not a batch; a bad event is skipped and counted in ``EventBatch.skipped`` instead.
    """
    is_map, decoders = _typed_decoders(payload)
    for decoder in decoders:
        try:
            batch = decoder.decode(payload)
        except _UNDECODABLE:
            continue
        return _from_typed(batch)
    return _decode_per_event(payload, is_map)


def _from_typed(batch: _Batch[_TypedEvent]) -> EventBatch:
    events: list[Event] = []
    skipped: dict[str, int] = {}
    for typed in batch.events:
        try:
            events.append(typed.to_event())
        except _Skip as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    return EventBatch(batch.ts, tuple(events), batch.data_parallel_rank, skipped)


def _decode_per_event(payload: bytes, is_map: bool) -> EventBatch:
    try:
        batch = cast("_Batch[msgspec.Raw]", _RAW_BATCH[is_map].decode(payload))
    except msgspec.ValidationError as exc:
        raise _batch_failure(payload, exc) from None
    except _UNDECODABLE as exc:
        raise DecodeError("msgpack", str(exc)) from None
    events: list[Event] = []
    skipped: dict[str, int] = {}
    for raw in batch.events:
        try:
            events.append(_decode_event(raw))
        except _Skip as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    return EventBatch(batch.ts, tuple(events), batch.data_parallel_rank, skipped)


def _batch_failure(payload: bytes, shape_error: msgspec.ValidationError) -> DecodeError:
    # msgspec stops at the first mismatch, before it would notice broken bytes further on.
    try:
        _ANY.decode(payload)
    except _UNDECODABLE as exc:
        return DecodeError("msgpack", str(exc))
    return DecodeError("batch_shape", str(shape_error))


def _decode_event(raw: msgspec.Raw) -> Event:
    try:
        typed = cast("_TypedEvent", _TYPED_EVENT[_starts_map(raw)].decode(raw))
    except _UNDECODABLE:
        try:
            obj = _ANY.decode(raw)
        except _UNDECODABLE:
            raise _Skip("event_shape") from None
        return _event_from_object(obj)
    return typed.to_event()


# --- plain-Python check: names the reason the typed path rejected an event ----------------

_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
)
_REMOVED_FIELDS = ("block_hashes", "medium")
# tag -> (field names in array order, fields required in array form, in map form)
_LAYOUTS: dict[str, tuple[tuple[str, ...], int, tuple[str, ...]]] = {
    "BlockStored": (_STORED_FIELDS, 4, ("block_hashes",)),
    "BlockRemoved": (_REMOVED_FIELDS, 1, ("block_hashes",)),
    "AllBlocksCleared": ((), 0, ()),
}


def _event_from_object(obj: object) -> Event:
    """Validate and convert one generically decoded event; raises _Skip with the reason.

    Mirrors the typed Structs' rules, so it names the reason they rejected an event. The
    rare event they reject and it accepts (a map with non-string keys besides valid fields)
    is decoded rather than dropped.
    """
    if isinstance(obj, list):
        if not obj or not isinstance(obj[0], str):
            raise _Skip("event_shape")
        tag = obj[0]
        layout = _LAYOUTS.get(tag)
        if layout is None:
            raise _Skip("unknown_type")
        names, required, _ = layout
        if len(obj) - 1 < required:
            raise _Skip("event_shape")
        fields: dict[Any, Any] = dict(zip(names, obj[1:], strict=False))
    elif isinstance(obj, dict):
        type_field = obj.get("type")
        if not isinstance(type_field, str):
            raise _Skip("event_shape")
        tag = type_field
        layout = _LAYOUTS.get(tag)
        if layout is None:
            raise _Skip("unknown_type")
        if any(name not in obj for name in layout[2]):
            raise _Skip("event_shape")
        fields = obj
    else:
        raise _Skip("event_shape")

    if tag == "BlockStored":
        return _stored_from_fields(fields)
    if tag == "BlockRemoved":
        hashes = _checked_hashes(fields["block_hashes"])
        return BlockRemoved(hashes, _tier(_checked_optional(fields.get("medium"), str)))
    return _CLEARED


def _stored_from_fields(fields: dict[Any, Any]) -> BlockStored:
    hashes = _checked_hashes(fields["block_hashes"])
    parent = fields.get("parent_block_hash")
    parent_hash = None if parent is None else _checked_hash(parent)
    token_ids = _checked_tokens(fields.get("token_ids"))
    block_size = fields.get("block_size", 0)
    if type(block_size) is not int or block_size < 0:
        raise _Skip("bad_field")
    return _stored(
        hashes,
        parent_hash,
        token_ids,
        block_size,
        _checked_optional(fields.get("lora_id"), int),
        _checked_optional(fields.get("medium"), str),
        _checked_optional(fields.get("lora_name"), str),
        _checked_extra_keys(fields.get("extra_keys")),
    )


_T = TypeVar("_T")


def _checked_optional(value: object, kind: type[_T]) -> _T | None:
    # Exact type: msgpack booleans decode to bool, which is not an int on the wire.
    if value is None or type(value) is kind:
        return value
    raise _Skip("bad_field")


def _checked_hash(value: object) -> EngineHash:
    if type(value) is int and _INT64_MIN <= value <= _MASK64:
        return value & _MASK64
    if type(value) is bytes and len(value) >= 8:
        return int.from_bytes(value[-8:], "big")
    raise _Skip("bad_hash")


def _checked_hashes(value: object) -> tuple[EngineHash, ...]:
    if not isinstance(value, list):
        raise _Skip("bad_hash")
    return tuple(map(_checked_hash, value))


def _checked_tokens(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Skip("bad_field")
    for token in value:
        if type(token) is not int or not 0 <= token < _TOKEN_LIMIT:
            raise _Skip("bad_field")
    return tuple(value)


def _checked_extra_keys(value: object) -> tuple[tuple[Any, ...] | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Skip("bad_field")
    entries: list[tuple[Any, ...] | None] = []
    for entry in value:
        if entry is None:
            entries.append(None)
        elif isinstance(entry, list):
            entries.append(tuple(entry))
        else:
            raise _Skip("bad_field")
    return tuple(entries)
