"""The per-block loops of key hashing and index lookup: native when built, else Python.

``service/_native.c`` implements each loop in C (~7x faster for a 512-block prompt,
docs/performance.md "Native loops"); the functions here are the reference, used when the
extension was not built (no C compiler or no xxhash.h at install time) and compared with it
in tests/unit/test_native.py. ``NATIVE`` says which one runs; the service logs it at start-up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import accumulate
from operator import and_
from typing import Final, TypeAlias

import xxhash

__all__ = [
    "FIELD",
    "GEN_SHIFT",
    "HELD",
    "NATIVE",
    "TIERS",
    "chain_keys",
    "lookup_values",
    "py_chain_keys",
    "py_lookup_values",
    "py_set_routed",
    "py_store_fields",
    "py_summarize",
    "set_routed",
    "store_fields",
    "summarize",
]

# One slot's 8-bit field in a packed holder value (the layout: service/index/memory.py).
FIELD: Final = 0xFF
HELD: Final = 0x01
TIERS: Final = 0x0E
GEN_SHIFT: Final = 4

SlotSummary: TypeAlias = tuple[int, int, dict[int, int]]
"""(match length, blocks held, leading blocks held by set of tiers)"""


def py_chain_keys(data: bytes, step: int, seed: int, /) -> list[int]:
    """Chained xxh3-64 over consecutive ``step``-byte pieces of ``data``, each seeded with
    the digest before it (the first with ``seed``); a trailing partial piece is ignored."""
    if step <= 0:
        raise ValueError("step must be positive")
    # Measured fastest on CPython 3.11: bytes slices beat memoryview slices and struct
    # packing (docs/performance.md, "Block keys").
    end = len(data) - len(data) % step
    keys: list[int] = []
    append = keys.append
    digest = xxhash.xxh3_64_intdigest
    key = seed
    for offset in range(0, end, step):
        key = digest(data[offset : offset + step], key)
        append(key)
    return keys


def py_lookup_values(
    by_route: list[dict[int, int]], mask: int, keys: Sequence[int], /
) -> list[int]:
    """``by_route[key & mask].get(key, 0)`` for every key."""
    if not 0 <= mask < len(by_route):
        raise ValueError("mask selects past the end of by_route")
    return [by_route[key & mask].get(key, 0) for key in keys]


def py_store_fields(
    by_route: list[dict[int, int]],
    mask: int,
    keys: Sequence[int],
    shift: int,
    tier_bit: int,
    gen_bits: int,
    /,
) -> tuple[int, list[int]]:
    """Store ``keys`` on one tier of the slot whose field is at bit ``shift``.

    A key the slot did not hold gets the field held + tier + generation; one it held gains
    the tier and takes the generation. Returns how many keys the slot did not hold, and the
    keys whose generation changed (the caller logs them for TTL expiry).
    """
    if not 0 <= mask < len(by_route):
        raise ValueError("mask selects past the end of by_route")
    if shift < 0 or tier_bit < 0 or tier_bit & ~TIERS or gen_bits & (HELD | TIERS | ~FIELD):
        raise ValueError("bad shift, tier bit or generation bits")
    fresh = (HELD | tier_bit | gen_bits) << shift
    added = 0
    to_log: list[int] = []
    for key in keys:
        bucket = by_route[key & mask]
        value = bucket.get(key, 0)
        old = (value >> shift) & FIELD
        if not old & HELD:
            bucket[key] = value | fresh
            added += 1
            to_log.append(key)
            continue
        new = (old & TIERS) | tier_bit | HELD | gen_bits
        if new != old:
            bucket[key] = value ^ ((old ^ new) << shift)
            if (old ^ new) >> GEN_SHIFT:
                to_log.append(key)
    return added, to_log


def py_set_routed(
    by_route: list[dict[int, int]],
    limits: list[int],
    mask: int,
    keys: Sequence[int],
    values: Sequence[int],
    /,
) -> list[int]:
    """``by_route[key & mask][key] = value`` for each pair; returns the routing values whose
    dict then holds more than its limit (repeats possible), for the caller to trim."""
    if not 0 <= mask < min(len(by_route), len(limits)):
        raise ValueError("mask selects past the end of by_route or limits")
    if len(keys) != len(values):
        raise ValueError("keys and values differ in length")
    over = []
    for key, value in zip(keys, values, strict=True):
        route = key & mask
        part = by_route[route]
        part[key] = value
        if len(part) > limits[route]:
            over.append(route)
    return over


def py_summarize(values: Sequence[int], slots: Sequence[int], /) -> list[SlotSummary]:
    """Per slot, over the packed holder values of a prompt's blocks in order: how many
    leading blocks it holds (match length), how many blocks it holds anywhere, and the
    leading blocks it holds counted by set of tiers (bitmask of ``1 << Tier``)."""
    # A slot's held bit survives an AND of values exactly while the slot holds every block
    # so far, so running[i] tells who holds blocks 0..i; other fields never mix into it.
    running = list(accumulate(values, and_))
    lengths = [_prefix_length(running, HELD << (8 * slot)) for slot in slots]
    # One C-level pass histograms the values, cut where each slot's prefix ends.
    histogram: Counter[int] = Counter()
    prefix_tiers: dict[int, dict[int, int]] = {}
    done = 0
    for index, length in sorted(enumerate(lengths), key=lambda item: item[1]):
        histogram.update(values[done:length])
        done = max(done, length)
        prefix_tiers[index] = _tier_sets(histogram, 8 * slots[index])
    histogram.update(values[done:])
    summaries = []
    for index, slot in enumerate(slots):
        shift = 8 * slot
        held = sum(n for v, n in histogram.items() if (v >> shift) & HELD)
        summaries.append((lengths[index], held, prefix_tiers[index] if lengths[index] else {}))
    return summaries


def _prefix_length(running: list[int], bit: int) -> int:
    """Length of the run of ``running`` with ``bit`` set (it is set on a prefix only)."""
    low, high = 0, len(running)
    while low < high:
        mid = (low + high) // 2
        if running[mid] & bit:
            low = mid + 1
        else:
            high = mid
    return low


def _tier_sets(histogram: Counter[int], shift: int) -> dict[int, int]:
    """Blocks per set of tiers held by the slot at ``shift``, over a histogram of values."""
    tier_sets: dict[int, int] = {}
    for value, count in histogram.items():
        field = (value >> shift) & FIELD
        if field & HELD:
            tiers = (field & TIERS) >> 1
            tier_sets[tiers] = tier_sets.get(tiers, 0) + count
    return tier_sets


try:
    from service._native import chain_keys, lookup_values, set_routed, store_fields, summarize

    NATIVE = True
except ImportError:  # not built: the reference loops run
    chain_keys = py_chain_keys
    lookup_values = py_lookup_values
    set_routed = py_set_routed
    store_fields = py_store_fields
    summarize = py_summarize
    NATIVE = False
