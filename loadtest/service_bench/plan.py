"""How much a run measures: the full plan and the quick one (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONCURRENCY", "FULL", "LARGE_FILL", "QUICK", "Plan"]

CONCURRENCY = (1, 16, 64)
LARGE_FILL = 10_000_000
"""The last memory point (``--rss-10m``, on in the full plan), filled after everything else."""


@dataclass(frozen=True)
class Plan:
    """Requests per latency cell (by concurrency) and warm-up requests before each, markers
    of the lag probe, seconds of the load's stretches, the index fills, and the ingest ramp
    (offered blocks/s per step, seconds per step before and during its measurement)."""

    requests: dict[int, int]
    warmup: int
    probes: int
    load_warmup: float
    ingest_window: float
    load_max_seconds: float
    ramp_rates: tuple[float, ...]
    ramp_warmup: float
    ramp_window: float
    fill_targets: tuple[int, ...] = (100_000, 1_000_000)
    large_fill: bool = False


# The paced load grows the index by 100k entries/s and the ramp by up to ~0.5M/s; the index
# and the engine-hash map are split into 64 dicts each, so growing costs no long stalls.
FULL = Plan(
    requests={1: 1000, 16: 800, 64: 1280},
    warmup=100,
    probes=40,
    load_warmup=1.0,
    ingest_window=4.0,
    load_max_seconds=240.0,
    ramp_rates=(50e3, 100e3, 150e3, 200e3, 250e3, 300e3, 400e3, 500e3, 600e3, 800e3),
    ramp_warmup=0.75,
    ramp_window=3.0,
    large_fill=True,
)
QUICK = Plan(
    requests={1: 300, 16: 480, 64: 640},
    warmup=30,
    probes=12,
    load_warmup=1.0,
    ingest_window=2.0,
    load_max_seconds=90.0,
    ramp_rates=(100e3, 200e3, 400e3, 600e3),
    ramp_warmup=0.5,
    ramp_window=1.5,
)
