"""The native index at a size where its tables grow many times (native/segmented_table.hpp:
Robin Hood probing, segments growing by half, backward-shift deletion): every key stored is
found, every key removed is gone, and nothing else moves, against a plain Python set."""

from __future__ import annotations

import random

from service import _dataplane

KEYS = 60_000


def held(table: _dataplane.BlockIndex, keys: list[int]) -> set[int]:
    """The keys of ``keys`` that pod p0 holds, one lookup per key."""
    return {key for key in keys if table.lookup("m", [key], 0.0)}


def test_a_table_grown_and_thinned_answers_for_every_key() -> None:
    rng = random.Random(7)
    table = _dataplane.BlockIndex(3600.0, 10 * KEYS)
    keys = list({rng.getrandbits(64) for _ in range(KEYS)} | set(range(1000)))  # and sequential
    for start in range(0, len(keys), 500):
        table.store("m", "p0", 0, keys[start : start + 500], 0, 0.0)
    assert table.stats()["entries"] == len(keys)
    gone = set(rng.sample(keys, len(keys) // 2))
    table.remove("m", "p0", 0, sorted(gone), 0, 0.0)
    left = set(keys) - gone
    assert table.stats()["entries"] == len(left)
    assert held(table, keys) == left
    assert table.stats()["keys_by_model"] == {"m": len(left)}
    never = [rng.getrandbits(64) for _ in range(2000)]
    assert held(table, [k for k in never if k not in left]) == set()
