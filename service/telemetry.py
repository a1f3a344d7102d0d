"""Prometheus metrics: one registry per service instance, no globals.

Names follow CONTRACT.md section 5. Index sizes and eviction totals are read from the
latest ``IndexStats`` snapshot at scrape time, so the index itself carries no metric code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.events.vllm import BATCH_ERROR_REASONS, EVENT_SKIP_REASONS
from service.index.protocol import EVICTION_REASONS, IndexStats
from service.index.translate import SKIP_REASONS

__all__ = ["DROP_REASONS", "Metrics"]

# Reasons a whole batch is dropped before its events are read.
DROP_REASONS = (
    "unidentified",
    "queue_full",
    "replay_buffer_full",
    "bad_frame",
    "pod_dropped",
    "internal_error",
)

_LATENCY_BUCKETS = (
    50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip


class _IndexCollector(Collector):
    """Exports the last index snapshot: sizes and evictions by reason."""

    def __init__(self) -> None:
        self.stats: IndexStats | None = None

    def collect(self) -> Iterable[Metric]:
        stats = self.stats
        blocks = GaugeMetricFamily("kv_cache_blocks_total", "Indexed (block, pod) entries")
        blocks.add_metric([], stats.entries if stats is not None else 0)
        model_blocks = GaugeMetricFamily(
            "kv_cache_model_blocks", "Indexed (block, pod) entries per model", labels=["model"]
        )
        evictions = CounterMetricFamily(
            "kv_cache_evictions", "Entries evicted from the index, by reason", labels=["reason"]
        )
        if stats is not None:
            by_model: dict[str, int] = {}
            for (model, _), count in stats.entries_by_pod.items():
                by_model[model] = by_model.get(model, 0) + count
            for model, count in sorted(by_model.items()):
                model_blocks.add_metric([model], count)
            for reason in EVICTION_REASONS:
                evictions.add_metric([reason], stats.evictions.get(reason, 0))
        yield blocks
        yield model_blocks
        yield evictions

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """Every metric the service exports, registered on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._asked = self._hits = 0
        r = self.registry
        self.index = _IndexCollector()
        r.register(self.index)
        self.events_received = Counter(
            "kv_cache_events_received", "Events decoded, by type", ["type"], registry=r
        )
        for event_type in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            self.events_received.labels(event_type)
        self.batches_received = Counter(
            "kv_cache_batches_received", "Event batches received, by source", ["source"],
            registry=r,
        )  # fmt: skip
        self.decode_errors = Counter(
            "kv_cache_event_decode_errors",
            "Events or batches skipped, by reason (nothing is dropped silently)",
            ["reason"],
            registry=r,
        )
        for reason in (*BATCH_ERROR_REASONS, *EVENT_SKIP_REASONS, *SKIP_REASONS, *DROP_REASONS):
            self.decode_errors.labels(reason)
        self.sequence_gaps = Counter(
            "kv_cache_sequence_gaps", "Gaps in a pod's event sequence", ["pod"], registry=r
        )
        self.lost_batches = Counter(
            "kv_cache_lost_batches",
            "Batches missed and not recovered by replay",
            ["pod"],
            registry=r,
        )
        self.replays = Counter(
            "kv_cache_replays", "Replay requests, by outcome", ["outcome"], registry=r
        )
        self.replay_duration = Histogram(
            "kv_cache_replay_duration_seconds", "Time to fetch a replay", registry=r
        )
        self.engine_restarts = Counter(
            "kv_cache_engine_restarts", "Engine restarts seen (sequence went back)", ["pod"],
            registry=r,
        )  # fmt: skip
        self.event_lag = Gauge(
            "kv_cache_event_lag_seconds",
            "Now minus the engine timestamp of the pod's last batch",
            ["pod"],
            registry=r,
        )
        self.visible_lag = Histogram(
            "kv_cache_event_visible_lag_seconds",
            "From the engine's batch timestamp to the batch being applied (visible to queries)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kv_cache_ingest_queue_depth", "Batches waiting to be applied", registry=r
        )
        self.pods_tracked = Gauge(
            "kv_cache_pods_tracked", "Pod streams (pod, rank) being tracked", registry=r
        )
        self.query_duration = Histogram(
            "kv_cache_query_duration_seconds",
            "Query latency inside the service, by api",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for api in ("rest", "grpc"):
            self.query_duration.labels(api)
        self.query_blocks = Counter(
            "kv_cache_query_blocks", "Prompt blocks asked about in queries", registry=r
        )
        self.query_hit_blocks = Counter(
            "kv_cache_query_hit_blocks", "Prompt blocks the best pod held", registry=r
        )
        self.hit_ratio = Gauge(
            "kv_cache_hit_ratio",
            "Blocks the best pod held / blocks asked about, over all queries so far",
            registry=r,
        )
        self.hash_mismatches = Counter(
            "kv_cache_hash_mismatches",
            "vllm key mode: engine hashes that differ from ours",
            ["model"],
            registry=r,
        )

    def forget_pod(self, pod_id: str) -> None:
        """Drops a pod's labelled series, so a deleted pod stops reporting its last values."""
        for metric in (self.sequence_gaps, self.lost_batches, self.engine_restarts, self.event_lag):
            with contextlib.suppress(KeyError):
                metric.remove(pod_id)

    def observe_query(self, api: str, seconds: float, total_blocks: int, hits: int) -> None:
        self.query_duration.labels(api).observe(seconds)
        if total_blocks:
            self.query_blocks.inc(total_blocks)
            self.query_hit_blocks.inc(hits)
            self._asked += total_blocks
            self._hits += hits
            self.hit_ratio.set(self._hits / self._asked)
