"""Prometheus metrics: one registry per service instance, no globals.

Names follow CONTRACT.md section 5. What the data plane counts (events, drops, sequence
gaps, the index's size and evictions, the ingest buffer...) it keeps itself, natively or in
Python; ``_PlaneCollector`` reads it at scrape time, so neither plane carries metric code.
The query path and the replay fetches, which run here, use ordinary metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.dataplane.protocol import PlaneCounts
    from service.dataplane.registry import StreamSnapshot

__all__ = ["DROP_REASONS", "EVENT_TYPES", "EVICTION_REASONS", "LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS: tuple[float, ...] = (
    50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip

DROP_REASONS: tuple[str, ...] = (
    # a payload that is not a batch (events/vllm.py)
    "msgpack",
    "batch_shape",
    # one event skipped (events/vllm.py)
    "unknown_type",
    "event_shape",
    "bad_hash",
    "bad_field",
    "unknown_medium",
    # one event (or part of it) that cannot be keyed (index/translate.py)
    "unknown_parent",
    "unmapped",
    "bad_tokens",
    # a whole frame dropped before its events are read
    "unidentified",
    "buffer_full",
    "replay_buffer_full",
    "bad_frame",
    "pod_dropped",
    "limit",
    "internal_error",
)
"""Every reason of ``kv_cache_event_decode_errors_total``: nothing is dropped silently."""

EVENT_TYPES: tuple[str, ...] = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
EVICTION_REASONS: tuple[str, ...] = ("removed", "cleared", "ttl", "capacity")


class PlaneSource(Protocol):
    """What the collector reads from the running data plane."""

    @property
    def kind(self) -> str: ...
    def counts(self) -> PlaneCounts: ...
    def streams(self) -> list[StreamSnapshot]: ...


class _PlaneCollector(Collector):
    """Exports the data plane's counters and stream snapshots at scrape time."""

    def __init__(self) -> None:
        self.plane: PlaneSource | None = None

    def collect(self) -> Iterable[Metric]:
        plane = self.plane
        counts = plane.counts() if plane is not None else None
        streams = plane.streams() if plane is not None else []
        yield from _index_metrics(counts, streams)
        yield from _ingest_metrics(counts, streams)
        yield from _stream_metrics(streams)

    def describe(self) -> Iterable[Metric]:
        return []


def _index_metrics(counts: PlaneCounts | None, streams: Sequence[StreamSnapshot]) -> list[Metric]:
    blocks = GaugeMetricFamily("kv_cache_blocks", "Indexed (block, pod) entries")
    blocks.add_metric([], counts.entries if counts is not None else 0)
    model_blocks = GaugeMetricFamily(
        "kv_cache_model_blocks", "Indexed (block, pod) entries per model", labels=["model"]
    )
    by_model: Tally[str] = Tally()
    for stream in streams:
        by_model[stream.model] += stream.blocks
    for model, count in sorted(by_model.items()):
        model_blocks.add_metric([model], count)
    evictions = CounterMetricFamily(
        "kv_cache_evictions", "Entries evicted from the index, by reason", labels=["reason"]
    )
    for reason in EVICTION_REASONS:
        evictions.add_metric([reason], counts.evictions.get(reason, 0) if counts else 0)
    pods = GaugeMetricFamily("kv_cache_pods_tracked", "Pod streams (pod, rank) being tracked")
    pods.add_metric([], len(streams))
    return [blocks, model_blocks, evictions, pods]


def _ingest_metrics(counts: PlaneCounts | None, streams: Sequence[StreamSnapshot]) -> list[Metric]:
    events = CounterMetricFamily(
        "kv_cache_events_received", "Events decoded, by type", labels=["type"]
    )
    for event_type in EVENT_TYPES:
        events.add_metric([event_type], counts.events.get(event_type, 0) if counts else 0)
    batches = CounterMetricFamily(
        "kv_cache_batches_received", "Event batches received, by source", labels=["source"]
    )
    for source in ("live", "replay"):
        batches.add_metric([source], counts.batches.get(source, 0) if counts else 0)
    drops = CounterMetricFamily(
        "kv_cache_event_decode_errors",
        "Events or batches skipped, by reason (nothing is dropped silently)",
        labels=["reason"],
    )
    for reason in DROP_REASONS:
        drops.add_metric([reason], counts.drops.get(reason, 0) if counts else 0)
    dropped = CounterMetricFamily(
        "kv_cache_frames_dropped",
        "Frames dropped before decoding because the ingest buffer was full, by pod",
        labels=["pod", "reason"],
    )
    buffer_bytes = GaugeMetricFamily(
        "kv_cache_ingest_buffer_bytes", "Bytes of frames waiting to be applied"
    )
    buffer_frames = GaugeMetricFamily(
        "kv_cache_ingest_buffer_frames", "Frames waiting to be applied"
    )
    buffer_limit = GaugeMetricFamily(
        "kv_cache_ingest_buffer_limit_bytes", "Bound of the ingest buffer (zmq.buffer_bytes)"
    )
    lag = HistogramMetricFamily(
        "kv_cache_event_visible_lag_seconds",
        "From the engine's batch timestamp to the batch being applied (visible to queries)",
    )
    if counts is not None:
        for pod, count in sorted(counts.dropped_by_pod.items()):
            dropped.add_metric([pod, "buffer_full"], count)
        buffer_bytes.add_metric([], counts.buffer_bytes)
        buffer_frames.add_metric([], counts.buffer_frames)
        buffer_limit.add_metric([], counts.buffer_max_bytes)
        cumulative = 0
        buckets = []
        for bound, count in zip(
            (*(str(b) for b in counts.lag_buckets), "+Inf"), counts.lag_counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        lag.add_metric([], buckets, counts.lag_sum)
    mismatches = CounterMetricFamily(
        "kv_cache_hash_mismatches",
        "vllm key mode: engine hashes that differ from ours",
        labels=["model"],
    )
    if counts is not None:
        for model, count in sorted(counts.hash_mismatches.items()):
            mismatches.add_metric([model], count)
    del streams
    return [events, batches, drops, dropped, buffer_bytes, buffer_frames, buffer_limit, lag,
            mismatches]  # fmt: skip


def _stream_metrics(streams: Sequence[StreamSnapshot]) -> list[Metric]:
    gaps = CounterMetricFamily(
        "kv_cache_sequence_gaps", "Gaps in a pod's event sequence", labels=["pod"]
    )
    lost = CounterMetricFamily(
        "kv_cache_lost_batches", "Batches missed and not recovered by replay", labels=["pod"]
    )
    restarts = CounterMetricFamily(
        "kv_cache_engine_restarts", "Engine restarts seen (sequence went back)", labels=["pod"]
    )
    lag = GaugeMetricFamily(
        "kv_cache_event_lag_seconds",
        "Now minus the engine timestamp of the pod's last batch, when it applied",
        labels=["pod"],
    )
    per_pod: dict[str, list[float]] = {}
    for s in streams:
        totals = per_pod.setdefault(s.pod_id, [0, 0, 0, 0.0])
        totals[0] += s.gaps
        totals[1] += s.lost
        totals[2] += s.restarts
        totals[3] = max(totals[3], s.lag)
    for pod, (pod_gaps, pod_lost, pod_restarts, pod_lag) in sorted(per_pod.items()):
        gaps.add_metric([pod], pod_gaps)
        lost.add_metric([pod], pod_lost)
        restarts.add_metric([pod], pod_restarts)
        lag.add_metric([pod], pod_lag)
    return [gaps, lost, restarts, lag]


def _version() -> str:
    try:
        return version("kv-cache")
    except PackageNotFoundError:
        return "0+unknown"


class QueryCounts:
    """Latency and hit counts of the queries answered in one place, per API."""

    def __init__(self) -> None:
        self.buckets: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}
        self.blocks = self.hit_blocks = 0

    def observe(self, api: str, seconds: float) -> None:
        counts = self.buckets.get(api)
        if counts is None:
            counts = self.buckets[api] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.seconds[api] = 0.0
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds[api] += seconds


NativeQueries = Callable[[], dict[str, Any]]
"""A native front's counts (``http_counts`` / ``grpc_counts`` of service._dataplane)."""


class _QueryCollector(Collector):
    """``kv_cache_query_*`` and the hit ratio, over the queries answered in Python and
    those the native gRPC front answered itself."""

    def __init__(self, counts: QueryCounts) -> None:
        self.counts = counts
        self.native: dict[str, NativeQueries] = {}

    def collect(self) -> Iterable[Metric]:
        by_api = {
            api: (list(b), self.counts.seconds[api]) for api, b in self.counts.buckets.items()
        }
        for api in ("rest", "grpc"):
            by_api.setdefault(api, ([0] * (len(LATENCY_BUCKETS) + 1), 0.0))
        blocks, hits = self.counts.blocks, self.counts.hit_blocks
        relayed = CounterMetricFamily(
            "kv_cache_relayed_requests",
            "Requests a native front passed to the Python server behind it, by api",
            labels=["api"],
        )
        for api, read in sorted(self.native.items()):
            native = read()
            relayed.add_metric([api], native["relayed"])
            if not native["buckets"]:
                continue
            buckets, seconds = by_api[api]
            by_api[api] = (
                [a + b for a, b in zip(buckets, native["buckets"], strict=True)],
                seconds + native["seconds"],
            )
            blocks += native["blocks"]
            hits += native["hit_blocks"]
        duration = HistogramMetricFamily(
            "kv_cache_query_duration_seconds",
            "Query latency inside the service, by api",
            labels=["api"],
        )
        bounds = (*(str(b) for b in LATENCY_BUCKETS), "+Inf")
        for api, (counts, seconds) in sorted(by_api.items()):
            duration.add_metric([api], list(zip(bounds, accumulate(counts), strict=True)), seconds)
        asked = CounterMetricFamily("kv_cache_query_blocks", "Prompt blocks asked about in queries")
        asked.add_metric([], blocks)
        held = CounterMetricFamily("kv_cache_query_hit_blocks", "Prompt blocks the best pod held")
        held.add_metric([], hits)
        ratio = GaugeMetricFamily(
            "kv_cache_hit_ratio",
            "Blocks the best pod held / blocks asked about, over all queries so far",
        )
        ratio.add_metric([], hits / blocks if blocks else 0.0)
        return [duration, asked, held, ratio, relayed]

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """Every metric the service exports, registered on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.plane = _PlaneCollector()
        r.register(self.plane)
        self.queries = QueryCounts()
        self._query_collector = _QueryCollector(self.queries)
        r.register(self._query_collector)
        self.build_info = Gauge(
            "kv_cache_build_info",
            "1, labelled with the version and the data plane running (native or python)",
            ["data_plane", "version"],
            registry=r,
        )
        self.replays = Counter(
            "kv_cache_replays", "Replay requests, by outcome", ["outcome"], registry=r
        )
        self.replay_duration = Histogram(
            "kv_cache_replay_duration_seconds", "Time to fetch a replay", registry=r
        )

    def watch(self, plane: PlaneSource) -> None:
        """Exports ``plane``'s counters from now on, and says which plane runs."""
        self.plane.plane = plane
        self.build_info.labels(plane.kind, _version()).set(1)

    def watch_native_queries(self, api: str, counts: NativeQueries) -> None:
        """Adds the queries a native front answers for ``api`` to the query metrics."""
        self._query_collector.native[api] = counts

    def observe_query(self, api: str, seconds: float, total_blocks: int, hits: int) -> None:
        self.queries.observe(api, seconds)
        self.queries.blocks += total_blocks
        self.queries.hit_blocks += hits
