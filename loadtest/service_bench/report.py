"""The Markdown report: targets met or missed, then the tables of every measurement."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from loadtest.service_bench.results import Results
from loadtest.service_bench.workload import BLOCKS_PER_EVENT

__all__ = ["format_ms", "format_us", "report"]

# Targets (issue 3), seconds.
TARGET_GRPC_P99 = 1e-3
TARGET_REST_P99 = 2e-3
TARGET_LAG_P99 = 5e-3


def format_us(seconds: float | None) -> str:
    """Seconds in microseconds, for the report and the progress lines."""
    if seconds is None:
        return "n/a"
    if math.isinf(seconds):
        return "> 1 s"  # the +Inf bucket
    return f"{seconds * 1e6:,.0f} us"


def format_ms(seconds: float | None) -> str:
    """Seconds in milliseconds, for the report and the progress lines."""
    if seconds is None:
        return "n/a"
    if math.isinf(seconds):
        return "> 1,000 ms"  # the +Inf bucket
    return f"{seconds * 1e3:,.2f} ms"


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    if math.isinf(value):
        return "**missed** (> 1 s)"
    return "met" if value <= target else f"**missed** ({value / target:.1f}x)"


def _entries(entries: tuple[float, float]) -> str:
    return f"{entries[0] / 1e6:.2f}M -> {entries[1] / 1e6:.2f}M"


def _ramp(results: Results, add: Callable[[str], None]) -> None:
    """The ingest ramp's steps."""
    threshold = results.ramp_lag_threshold * 1e3
    add(
        f"Ingest ramp: the 8 publishers offer more blocks/s each step, paced, no queries;"
        f" lag from the histogram over the step's measured stretch. A step is sustained when"
        f" lag p99 <= {threshold:g} ms, the daemon applied >= 95% of the offered rate, nothing"
        f" was dropped and the backlog drained. A step that failed on lag alone is tried once more"
        f" (one stall can do that); the ramp stops at the first step that is not sustained:"
    )
    add("")
    add(
        "| target | offered | applied | batches/s | lag p50 | lag p99 | top bucket |"
        " CPU: daemon / publishers | drain after | drops | entries | sustained |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results.ramp:
        drain = "> 10 s" if r.drain is None else format_ms(r.drain)
        verdict = ("yes" if r.sustained else "**no**") + (f": {r.why}" if r.why else "")
        add(
            f"| {r.target:,.0f} | {r.offered:,.0f} | {r.applied:,.0f} |"
            f" {r.batches / r.seconds:,.0f} | {format_ms(r.lag_p50)} | {format_ms(r.lag_p99)} |"
            f" {format_ms(r.lag_max_bucket)} | {r.daemon_cpu:.0%} / {r.publishers_cpu:.0%} |"
            f" {drain} | {r.buffer_full_drops:,.0f} | {_entries(r.entries)} | {verdict} |"
        )
    add("")
    best = results.ramp_sustained
    add(
        "Highest sustained: "
        + ("none" if best is None else f"**{best:,.0f} blocks/s**")
        + f" ({BLOCKS_PER_EVENT}-block events, {results.events_per_batch} per batch)."
    )
    add("")


def report(results: Results, command: str) -> str:
    """The Markdown report of ``results``, headed by the ``command`` that made them."""
    out: list[str] = []
    add = out.append
    add(f"Command: `{command}` ({results.mode} mode)")
    add("")
    add(
        f"Setup: {results.cpus} CPUs; {results.pinned}. Load: {results.rate_target:,.0f}"
        f" blocks/s offered by 8 publisher processes, {BLOCKS_PER_EVENT}-block events,"
        f" {results.events_per_batch} per batch; index.max_size {results.max_size:,}."
    )
    add("")
    load = {(c.api, c.concurrency): c for c in results.cells if c.state == "load"}
    grpc_c1, rest_c1 = load.get(("grpc", 1)), load.get(("rest", 1))
    grpc_p99 = None if grpc_c1 is None else grpc_c1.client_p99
    rest_p99 = None if rest_c1 is None else rest_c1.client_p99
    if results.others_cpu:
        add(
            "CPU used by other processes on the machine meanwhile (not this benchmark): "
            + ", ".join(f"{k} phase {v:.0%} of a core" for k, v in results.others_cpu.items())
            + "."
        )
        add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    add(
        f"| gRPC p99 <= 1 ms, c=1, under ingest | {format_us(grpc_p99)} |"
        f" {_verdict(grpc_p99, TARGET_GRPC_P99)} |"
    )
    add(
        f"| REST p99 <= 2 ms, c=1, under ingest (httpx) | {format_us(rest_p99)} |"
        f" {_verdict(rest_p99, TARGET_REST_P99)} |"
    )
    for w in results.windows:
        add(
            f"| lag p99 <= 5 ms, {w.name} | {format_ms(w.p99)} |"
            f" {_verdict(w.p99, TARGET_LAG_P99)} |"
        )
    for p in results.probes:
        if p.state == "load":
            add(
                f"| lag p99 <= 5 ms, marker probe | {format_ms(p.p99)} |"
                f" {_verdict(p.p99, TARGET_LAG_P99)} |"
            )
    if results.ramp:
        add(
            f"| ingest ramp: highest offered rate with lag p99 <="
            f" {results.ramp_lag_threshold * 1e3:g} ms and nothing behind | "
            + (
                "none"
                if results.ramp_sustained is None
                else f"{results.ramp_sustained:,.0f} blocks/s"
            )
            + " | (report) |"
        )
    add("")
    add(
        "Query latency, 8192-token prompt (512 blocks), 8 pods match. Client-observed;"
        " service = `kv_cache_query_duration_seconds` (inside QueryService, bucket-interpolated);"
        " CPU per request from /proc (daemon: under load includes ingest); lag = visible lag"
        " of the batches applied during the cell; backlog = time after the cell until the"
        " ingest buffer was empty and every pod's last batch fresh again (the next cell starts"
        " then):"
    )
    add("")
    add(
        "| api | state | c | n | p50 | p99 | max | req/s | service p50 / p99 |"
        " daemon CPU/req | client CPU/req | lag p50 / p99 | backlog | entries |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in results.cells:
        lag = "-" if c.lag_p99 is None else f"{format_ms(c.lag_p50)} / {format_ms(c.lag_p99)}"
        backlog = "-" if c.state == "idle" else format_ms(c.recovery) if c.recovery else "> 15 s"
        add(
            f"| {c.api} | {c.state} | {c.concurrency} | {c.requests:,}"
            + (f" ({c.errors} err)" if c.errors else "")
            + f" | {format_us(c.client_p50)} | {format_us(c.client_p99)} |"
            f" {format_us(c.client_max)} |"
            f" {c.rps:,.0f} | {format_us(c.service_p50)} / {format_us(c.service_p99)} |"
            f" {format_us(c.daemon_cpu)} | {format_us(c.client_cpu)} | {lag} | {backlog} |"
            f" {_entries(c.entries)} |"
        )
    if results.grpc_error:
        add("")
        add(f"gRPC not measured: {results.grpc_error}")
    add("")
    ing = results.ingest
    if ing:
        drain = ing["drain_seconds"]
        add("Ingest over the loaded measurements:")
        add("")
        add(
            "| offered | applied | batches/s | CPU: daemon / publishers / client |"
            " buffer frames max (sampled) | buffer_full drops | gaps / lost | drain after stop |"
        )
        add("|---|---|---|---|---|---|---|---|")
        add(
            f"| {ing['offered_blocks_per_s']:,.0f} blocks/s |"
            f" {ing['applied_blocks_per_s']:,.0f} blocks/s | {ing['batches_per_s']:,.0f} |"
            f" {ing['daemon_cpu']:.0%} / {ing['publishers_cpu']:.0%} / {ing['client_cpu']:.0%}"
            f" | {ing['buffer_frames_max_sampled']:.0f} ({ing['buffer_frames_samples']:.0f}"
            f" samples, between cells) | {ing['buffer_full_drops']:.0f} |"
            f" {ing['sequence_gaps']:.0f} / {ing['lost_batches']:.0f} |"
            f" {'not drained' if drain < 0 else f'{drain * 1e3:,.0f} ms'} |"
        )
        add("")
        add(
            f"Other skipped events: {ing['other_skips']:.0f}; publisher catch-up skips:"
            f" {ing['publisher_skips']:.0f}; index entries"
            f" {_entries((ing['entries_start'], ing['entries_end']))}."
        )
        add("")
    if results.windows:
        add(
            "Event-to-visible lag (engine batch ts -> applied), histogram"
            " `kv_cache_event_visible_lag_seconds`, quantiles interpolated within buckets"
            " (bounds 0.5, 0.75, 1, 2, 5, 10, 25, 50, 100, 250 ms):"
        )
        add("")
        add("| window | seconds | batches | p50 | p99 | p99.9 | over 5 ms | entries |")
        add("|---|---|---|---|---|---|---|---|")
        for w in results.windows:
            over = "n/a" if w.over_5ms is None else f"{w.over_5ms:.2%}"
            add(
                f"| {w.name} | {w.seconds:.1f} | {w.batches:,.0f} | {format_ms(w.p50)} |"
                f" {format_ms(w.p99)} | {format_ms(w.p999)} | {over} | {_entries(w.entries)} |"
            )
        add("")
    if results.ramp:
        _ramp(results, add)
    if results.probes:
        add(
            "Marker probe: publish one new block, poll `POST /v1/locality` (16 tokens, raw"
            " keep-alive connection) until a pod holds it; the figure is until the client saw"
            " it, so it over-reads by up to one poll round trip (the resolution):"
        )
        add("")
        add("| state | markers | p50 | p99 | max | poll round trip |")
        add("|---|---|---|---|---|---|")
        for p in results.probes:
            add(
                f"| {p.state} | {p.count}"
                + (f" ({p.timeouts} timed out)" if p.timeouts else "")
                + f" | {format_ms(p.p50)} | {format_ms(p.p99)} | {format_ms(p.max)} |"
                f" {format_us(p.poll_rtt)} |"
            )
        add("")
    add("Daemon memory (VmRSS from /proc/<pid>/status):")
    add("")
    add("| index entries | RSS | peak (VmHWM) |")
    add("|---|---|---|")
    for m in results.memory:
        add(f"| {m['entries']:,.0f} | {m['rss'] / 2**20:,.1f} MiB | {m['hwm'] / 2**20:,.1f} MiB |")
    points = sorted((m["entries"], m["rss"]) for m in results.memory)
    marks = [
        next((p for p in points if low <= p[0] <= high), None)
        for low, high in ((95_000, 120_000), (950_000, 1_050_000), (9_900_000, 10_500_000))
    ]
    growth = [
        f"{a[0]:,.0f} -> {b[0]:,.0f} entries: {(b[1] - a[1]) / (b[0] - a[0]):,.0f} B per entry"
        for a, b in itertools.pairwise(marks)
        if a is not None and b is not None
    ]
    if growth:
        add("")
        add("RSS growth, " + "; ".join(growth) + ".")
    for name, fill in (("100k and 1M", results.fill), ("10M", results.fill_large)):
        if fill:
            add("")
            add(
                f"Fill rate to {name} (bursts, as fast as the daemon applies, no queries):"
                f" {fill['blocks'] / fill['seconds']:,.0f} blocks/s"
                f" ({fill['blocks']:,.0f} blocks in {fill['seconds']:.1f} s)."
            )
    if results.daemon_log:
        add("")
        add(
            "Daemon log lines: "
            + ", ".join(f"{k} {v}" for k, v in sorted(results.daemon_log.items()))
            + "."
        )
    return "\n".join(out)
