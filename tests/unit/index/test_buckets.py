"""The routing of keys over the index's and the engine-hash map's dicts."""

from __future__ import annotations

import random

from service.index.buckets import BUCKETS, ROUTE, ROUTE_MASK, SHARES, new_buckets


def test_every_low_bit_value_has_one_dict_and_every_dict_takes_some() -> None:
    assert len(ROUTE) == ROUTE_MASK + 1
    assert set(ROUTE) == set(range(BUCKETS))
    assert sum(SHARES) == len(ROUTE)
    assert len(new_buckets()) == BUCKETS


def test_shares_are_uneven_so_dicts_do_not_rebuild_together() -> None:
    assert min(SHARES) >= 2
    assert max(SHARES) >= 2 * min(SHARES)


def test_a_large_index_is_cut_into_small_dicts() -> None:
    """At 16M keys no dict holds more than ~25k keys, so a rebuild stays ~1-2 ms."""
    rng = random.Random(7)
    sizes = [0] * BUCKETS
    for _ in range(200_000):
        sizes[ROUTE[rng.getrandbits(64) & ROUTE_MASK]] += 1
    assert max(sizes) * (16_000_000 // 200_000) < 30_000
