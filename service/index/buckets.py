"""Int-keyed maps cut into 1024 dicts, so no single dict resize stalls the event loop.

A CPython dict grows, and under churn rebuilds itself, in one go, at ~60-80 ns per key: at
1M keys that is ~60 ms. Cut into 1024 dicts, a rebuild at 16M keys (the largest index
documented) moves ~16k keys, ~1-2 ms; at 3M keys ~0.3 ms. (64 dicts, as before, left
8-34 ms stalls at 3M keys.) With keys spread evenly the dicts would all fill up, and
rebuild, within the same fraction of a second, so the 4096 values of a key's low 12 bits
are dealt out unevenly (2 to 6 per dict): dicts of different sizes reach their thresholds
at different times.
"""

from __future__ import annotations

import random
from typing import Final

__all__ = ["BUCKETS", "ROUTE", "ROUTE_MASK", "SHARES", "new_buckets"]

BUCKETS: Final = 1024
ROUTE_MASK: Final = 0xFFF
_VALUES: Final = ROUTE_MASK + 1


def _route() -> tuple[int, ...]:
    shares = [2 + (bucket * 4) // (BUCKETS - 1) for bucket in range(BUCKETS)]
    while sum(shares) > _VALUES:
        shares[shares.index(max(shares))] -= 1
    while sum(shares) < _VALUES:
        shares[shares.index(min(shares))] += 1
    route = [bucket for bucket, share in enumerate(shares) for _ in range(share)]
    random.Random(0).shuffle(route)  # fixed: the same routing in every process
    return tuple(route)


ROUTE: Final = _route()
"""``ROUTE[key & ROUTE_MASK]`` is the dict a key lives in."""


SHARES: Final = tuple(ROUTE.count(bucket) for bucket in range(BUCKETS))
"""How many of the 4096 low-12-bit values each dict takes: its expected share of keys,
/4096."""


def new_buckets() -> list[dict[int, int]]:
    return [{} for _ in range(BUCKETS)]
