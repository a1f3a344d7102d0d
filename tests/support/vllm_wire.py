"""Build KV-event payloads shaped as each vLLM release publishes them.

Events are described once, with canonical unsigned 64-bit block hashes, then encoded for a
release (``version``), a hash representation (``hash_style``) and a batch form
(``envelope``). The bytes are what vLLM's msgspec encoder writes: array-form events carry
every field their release has; map-form events leave out fields that have a default and hold
it (``omit_defaults=True``), and so does the batch for a null rank. Fields a release does not
have are dropped (a 0.9 event carries no medium).

    payload = encode_batch([stored([h1, h2], tokens, block_size=16)], version="0.10.2")
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import msgpack

__all__ = [
    "VERSIONS",
    "Envelope",
    "HashStyle",
    "RawEvent",
    "Version",
    "WireCleared",
    "WireEvent",
    "WireRemoved",
    "WireStored",
    "cleared",
    "encode_batch",
    "encode_event",
    "pack",
    "raw",
    "removed",
    "stored",
    "wire_hash",
]

Version = Literal["0.9", "0.10.2", "0.14", "0.17", "0.20", "0.23", "0.24", "0.33"]
VERSIONS: tuple[Version, ...] = get_args(Version)
HashStyle = Literal["uint", "int", "bytes"]
"""``uint``: vLLM >= 0.10.2's int; ``int``: older builtin hash, signed; ``bytes``: a digest."""
Envelope = Literal["array", "map"]

# Fields after the tag, in wire order; a release's array stops after its last field.
_STORED_FIELDS: tuple[str, ...] = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
_REMOVED_FIELDS: tuple[str, ...] = ("block_hashes", "medium", "group_idx")
_STORED_COUNT: dict[Version, int] = {
    "0.9": 5,
    "0.10.2": 6,
    "0.14": 7,
    "0.17": 8,
    "0.20": 9,
    "0.23": 11,
    "0.24": 11,
    "0.33": 11,
}
_REMOVED_COUNT: dict[Version, int] = {
    "0.9": 1,
    "0.10.2": 2,
    "0.14": 2,
    "0.17": 2,
    "0.20": 3,
    "0.23": 3,
    "0.24": 3,
    "0.33": 3,
}
# Fields declared with a default (None) in vLLM's structs, hence omitted when unset.
_DEFAULTED = frozenset(
    {"extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"}
)
_MAP_VERSIONS: frozenset[Version] = frozenset({"0.24", "0.33"})
# Fields newer releases add and this project's decoder does not know; values are stand-ins.
_NEWER_REMOVED_FIELDS: dict[str, object] = {"locality": "local", "ownership": "owner"}
_NEWER_STORED_FIELDS: dict[str, object] = {
    **_NEWER_REMOVED_FIELDS,
    "session_id": "session-0",
    "lookahead_token_ids": [1, 2, 3],
}


@dataclass(frozen=True, slots=True)
class WireStored:
    """A ``BlockStored`` event; hashes are unsigned 64-bit ints, encoded per ``hash_style``."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[tuple[object, ...] | None, ...] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


@dataclass(frozen=True, slots=True)
class WireRemoved:
    """A ``BlockRemoved`` event."""

    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class WireCleared:
    """An ``AllBlocksCleared`` event."""


@dataclass(frozen=True, slots=True)
class RawEvent:
    """An already-encoded event (any msgpack-able value), put in the batch as it is."""

    value: object


WireEvent = WireStored | WireRemoved | WireCleared


def stored(
    block_hashes: Sequence[int],
    token_ids: Sequence[int] = (),
    *,
    block_size: int = 16,
    parent: int | None = None,
    medium: str | None = None,
    lora_name: str | None = None,
    lora_id: int | None = None,
    extra_keys: Sequence[tuple[object, ...] | None] | None = None,
    group_idx: int | None = None,
    kv_cache_spec_kind: str | None = None,
    kv_cache_spec_sliding_window: int | None = None,
) -> WireStored:
    """A ``BlockStored`` event for the given blocks (``token_ids`` may be empty)."""
    return WireStored(
        block_hashes=tuple(block_hashes),
        parent_block_hash=parent,
        token_ids=tuple(token_ids),
        block_size=block_size,
        lora_id=lora_id,
        medium=medium,
        lora_name=lora_name,
        extra_keys=None if extra_keys is None else tuple(extra_keys),
        group_idx=group_idx,
        kv_cache_spec_kind=kv_cache_spec_kind,
        kv_cache_spec_sliding_window=kv_cache_spec_sliding_window,
    )


def removed(
    block_hashes: Sequence[int], *, medium: str | None = None, group_idx: int | None = None
) -> WireRemoved:
    """A ``BlockRemoved`` event."""
    return WireRemoved(tuple(block_hashes), medium, group_idx)


def cleared() -> WireCleared:
    """An ``AllBlocksCleared`` event."""
    return WireCleared()


def raw(value: object) -> RawEvent:
    """An event sent exactly as ``value`` (to inject malformed or future events)."""
    return RawEvent(value)


def wire_hash(value: int, style: HashStyle) -> int | bytes:
    """``value`` (unsigned 64-bit) as a release would put it on the wire."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"not an unsigned 64-bit hash: {value}")
    if style == "uint":
        return value
    if style == "int":
        return value - (1 << 64) if value >= 1 << 63 else value
    # A 32-byte digest whose last 8 bytes are the hash; the rest is arbitrary but stable.
    prefix = hashlib.sha256(value.to_bytes(8, "big")).digest()[:24]
    return prefix + value.to_bytes(8, "big")


def _field_values(event: WireStored | WireRemoved, hash_style: HashStyle) -> dict[str, object]:
    hashes = [wire_hash(h, hash_style) for h in event.block_hashes]
    if isinstance(event, WireRemoved):
        return {"block_hashes": hashes, "medium": event.medium, "group_idx": event.group_idx}
    parent = event.parent_block_hash
    return {
        "block_hashes": hashes,
        "parent_block_hash": None if parent is None else wire_hash(parent, hash_style),
        "token_ids": list(event.token_ids),
        "block_size": event.block_size,
        "lora_id": event.lora_id,
        "medium": event.medium,
        "lora_name": event.lora_name,
        "extra_keys": None
        if event.extra_keys is None
        else [None if e is None else list(e) for e in event.extra_keys],
        "group_idx": event.group_idx,
        "kv_cache_spec_kind": event.kv_cache_spec_kind,
        "kv_cache_spec_sliding_window": event.kv_cache_spec_sliding_window,
    }


def encode_event(
    event: WireEvent | RawEvent, *, version: Version = "0.23", hash_style: HashStyle = "uint"
) -> object:
    """The msgpack-able value ``version`` publishes for ``event``."""
    if isinstance(event, RawEvent):
        return event.value
    if isinstance(event, WireCleared):
        tag = "AllBlocksCleared"
        return {"type": tag} if version in _MAP_VERSIONS else [tag]
    if isinstance(event, WireStored):
        tag, names, count = "BlockStored", _STORED_FIELDS, _STORED_COUNT[version]
    else:
        tag, names, count = "BlockRemoved", _REMOVED_FIELDS, _REMOVED_COUNT[version]
    values = _field_values(event, hash_style)
    present = names[:count]
    if version in _MAP_VERSIONS:
        encoded: dict[str, object] = {"type": tag}
        for name in present:
            if not (name in _DEFAULTED and values[name] is None):
                encoded[name] = values[name]
        if version == "0.33":
            newer = _NEWER_STORED_FIELDS if tag == "BlockStored" else _NEWER_REMOVED_FIELDS
            encoded.update(newer)
        return encoded
    return [tag, *(values[name] for name in present)]


def encode_batch(
    events: Sequence[WireEvent | RawEvent],
    *,
    ts: float = 1_700_000_000.0,
    dp_rank: int | None = 0,
    version: Version = "0.23",
    hash_style: HashStyle = "uint",
    envelope: Envelope = "array",
) -> bytes:
    """The payload bytes of one batch, as ``version`` publishes it.

    ``envelope="array"`` is what releases send: ``[ts, events, rank]``, or ``[ts, events]``
    for 0.9, which had no rank. ``"map"`` is ``{ts, events, data_parallel_rank}``, without
    the rank when it is None.
    """
    encoded = [encode_event(e, version=version, hash_style=hash_style) for e in events]
    has_rank = version != "0.9"
    if envelope == "map":
        batch: dict[str, object] = {"ts": ts, "events": encoded}
        if has_rank and dp_rank is not None:
            batch["data_parallel_rank"] = dp_rank
        return pack(batch)
    return pack([ts, encoded, dp_rank] if has_rank else [ts, encoded])


def pack(value: object) -> bytes:
    """msgpack ``value`` the way vLLM's encoder does (bytes as bin, str as str)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
