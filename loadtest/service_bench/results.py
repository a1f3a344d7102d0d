"""What the benchmark measures: latency cells, lag windows, marker probes, and the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.service_bench.metrics import Snapshot, histogram_quantile

__all__ = ["LAG", "Cell", "Probes", "RampStep", "Results", "Window"]

LAG = "kv_cache_event_visible_lag_seconds"
"""The histogram of engine batch ts -> applied."""


@dataclass
class Cell:
    """Latency of one (api, client, state, concurrency)."""

    api: str
    state: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    client_p50: float
    client_p99: float
    client_mean: float
    client_max: float
    service_p50: float | None
    service_p99: float | None
    daemon_cpu: float  # daemon CPU seconds per request (under load: includes ingest)
    client_cpu: float  # this process' CPU seconds per request
    lag_p50: float | None = None  # visible lag of the batches applied during the cell
    lag_p99: float | None = None
    entries: tuple[float, float] = (0.0, 0.0)
    recovery: float | None = None  # seconds until the ingest backlog was gone after the cell

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Window:
    """Visible lag (histogram) over one stretch of the load."""

    name: str
    seconds: float
    batches: float
    p50: float | None
    p99: float | None
    p999: float | None
    over_5ms: float | None
    entries: tuple[float, float]

    @classmethod
    def between(
        cls, name: str, before: Snapshot, after: Snapshot, entries: tuple[float, float]
    ) -> Window:
        """The lag of the batches applied between two scrapes."""
        lag = after.buckets_since(before, LAG)
        count = lag[-1][1] if lag else 0.0
        return cls(
            name=name,
            seconds=after.at - before.at,
            batches=count,
            p50=histogram_quantile(lag, 0.50),
            p99=histogram_quantile(lag, 0.99),
            p999=histogram_quantile(lag, 0.999),
            over_5ms=None if not count else 1 - dict(lag).get(5e-3, 0.0) / count,
            entries=entries,
        )


@dataclass
class Probes:
    state: str
    count: int
    timeouts: int
    p50: float | None
    p99: float | None
    max: float | None
    poll_rtt: float | None  # mean round trip of one poll: the resolution


@dataclass
class RampStep:
    """One step of the ingest ramp: what the publishers offered, what the daemon applied
    over the measured stretch, its visible lag, and whether it kept up."""

    target: float  # blocks/s asked of the publishers
    offered: float  # blocks/s they sent over the whole step
    applied: float  # blocks/s applied over the measured stretch
    seconds: float
    batches: float
    lag_p50: float | None
    lag_p99: float | None
    lag_max_bucket: float | None  # the upper bound of the highest non-empty bucket
    buffer_full_drops: float
    publisher_skips: int  # times a publisher fell > 50 ms behind its pace
    drain: float | None  # seconds until the buffer was empty after the step; None: not in 10 s
    daemon_cpu: float  # cores over the measured stretch
    publishers_cpu: float
    entries: tuple[float, float]
    sustained: bool
    why: str  # why not sustained ("" when it was)


@dataclass
class Results:
    mode: str
    pinned: str
    cpus: int
    rate_target: float
    max_size: int
    events_per_batch: int
    cells: list[Cell] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    probes: list[Probes] = field(default_factory=list)
    memory: list[dict[str, float]] = field(default_factory=list)
    fill: dict[str, float] = field(default_factory=dict)
    fill_large: dict[str, float] = field(default_factory=dict)  # the fill to 10M entries
    ingest: dict[str, float] = field(default_factory=dict)
    grpc_error: str | None = None
    daemon_log: dict[str, int] = field(default_factory=dict)
    others_cpu: dict[str, float] = field(default_factory=dict)  # phase -> cores, not ours
    ramp: list[RampStep] = field(default_factory=list)
    ramp_lag_threshold: float = 5e-3
    ramp_sustained: float | None = None  # highest offered blocks/s that was sustained
