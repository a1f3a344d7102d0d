"""The daemon's ``/metrics``: scrapes, parsed snapshots, and quantiles of samples and of
histogram buckets."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx

__all__ = ["Scraper", "Snapshot", "histogram_quantile", "quantile"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative ``(le, count)`` buckets, linear within a bucket (as
    Prometheus' ``histogram_quantile``); None without observations; ``inf`` when it falls
    in the +Inf bucket (beyond the highest bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    low, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return math.inf
            if count == below:
                return le
            return low + (le - low) * (rank - below) / (count - below)
        low, below = le, count
    return low


@dataclass(frozen=True)
class Snapshot:
    """One scrape of ``/metrics``, taken at ``at`` (perf_counter seconds)."""

    at: float
    samples: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]

    @classmethod
    def parse(cls, text: str, at: float) -> Snapshot:
        samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            labels = tuple(sorted(_LABEL.findall(match[2] or "")))
            samples.append((match[1], labels, float(match[3])))
        return cls(at, tuple(samples))

    def _matching(
        self, name: str, labels: dict[str, str]
    ) -> Iterator[tuple[dict[str, str], float]]:
        for sample_name, sample_labels, value in self.samples:
            if sample_name != name:
                continue
            found = dict(sample_labels)
            if all(found.get(k) == v for k, v in labels.items()):
                yield found, value

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` carrying ``labels`` (0 when none)."""
        return sum(value for _, value in self._matching(name, labels))

    def max_value(self, name: str, **labels: str) -> float:
        """The largest sample of ``name`` carrying ``labels`` (0 when none)."""
        return max((value for _, value in self._matching(name, labels)), default=0.0)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` buckets of histogram ``name``, summed over the other
        labels."""
        found: dict[float, float] = {}
        for sample_labels, value in self._matching(f"{name}_bucket", labels):
            le = float(sample_labels["le"])
            found[le] = found.get(le, 0.0) + value
        return sorted(found.items())

    def buckets_since(
        self, before: Snapshot, name: str, **labels: str
    ) -> list[tuple[float, float]]:
        """The buckets of what histogram ``name`` observed between ``before`` and this."""
        earlier = dict(before.buckets(name, **labels))
        return [(le, count - earlier.get(le, 0.0)) for le, count in self.buckets(name, **labels)]


class Scraper:
    """Scrapes ``/metrics`` on its own connection and keeps every ingest buffer frame count
    seen."""

    def __init__(self, base_url: str) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=10.0)
        self.buffer_frames: list[float] = []

    async def scrape(self) -> Snapshot:
        response = await self._client.get("/metrics")
        response.raise_for_status()
        snapshot = Snapshot.parse(response.text, time.perf_counter())
        self.buffer_frames.append(snapshot.value("kv_cache_ingest_buffer_frames"))
        return snapshot

    async def aclose(self) -> None:
        await self._client.aclose()
