"""The scenario: fill the index (memory), query it idle and under paced load (latency),
measure the event-to-visible lag meanwhile, ramp the offered ingest rate until the daemon
stops keeping up, and last fill the index to 10M entries (memory, when planned)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import statistics
import time
from collections.abc import AsyncIterator

import grpc

from loadtest.service_bench.clients import QueryClients
from loadtest.service_bench.daemon import Daemon, machine_busy_seconds
from loadtest.service_bench.metrics import Scraper, Snapshot, histogram_quantile, quantile
from loadtest.service_bench.plan import CONCURRENCY, LARGE_FILL, Plan
from loadtest.service_bench.probe import MarkerProbe
from loadtest.service_bench.progress import Bar, Progress
from loadtest.service_bench.publishers import Publishers
from loadtest.service_bench.report import format_ms, format_us
from loadtest.service_bench.results import LAG, Cell, RampStep, Results, Window
from loadtest.service_bench.workload import (
    BLOCKS_PER_EVENT,
    PREFIX_BLOCKS,
    PROMPT_BLOCKS,
    make_prompt,
    pod_id,
)

__all__ = ["run"]

QUERY = "kv_cache_query_duration_seconds"


def _applied(snapshot: Snapshot) -> float:
    """``BlockStored`` events the daemon has applied."""
    return snapshot.value("kv_cache_events_received_total", type="BlockStored")


def _dropped(snapshot: Snapshot) -> float:
    """Batches (frames) the daemon dropped because its ingest buffer was full."""
    return snapshot.value("kv_cache_event_decode_errors_total", reason="buffer_full")


def _top_bucket(buckets: list[tuple[float, float]]) -> float | None:
    """The upper bound of the highest non-empty bucket (``inf``: beyond the top bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    return next(le for le, count in buckets if count >= buckets[-1][1])


async def run(
    daemon: Daemon,
    publishers: Publishers,
    plan: Plan,
    results: Results,
    progress: Progress,
    rate: float,
) -> None:
    """Every phase against a ready daemon and its publishers, into ``results``."""
    bench = Bench(daemon, publishers, plan, results, progress, rate)
    try:
        await bench.run()
    finally:
        await bench.close()


class Bench:
    """The phases and what they share: clients, scraper, probe, the entry count's base.
    Made inside the event loop (the gRPC channel binds to it); ``close`` when done."""

    def __init__(
        self,
        daemon: Daemon,
        publishers: Publishers,
        plan: Plan,
        results: Results,
        progress: Progress,
        rate: float,
    ) -> None:
        self.daemon = daemon
        self.publishers = publishers
        self.plan = plan
        self.results = results
        self.progress = progress
        self.rate = rate
        self.expected = {pod_id(i): n for i, n in enumerate(PREFIX_BLOCKS)}
        self.entry_base: tuple[float, float] | None = None
        self.grpc_ok = False
        self.loading = False  # the paced load runs (lag gauges are fresh)
        self.clients = QueryClients(daemon, make_prompt(), max(CONCURRENCY))
        self.scraper = Scraper(daemon.base_url)
        self.probe = MarkerProbe(daemon.http_port, progress)

    async def run(self) -> None:
        error = await self.clients.grpc_ready(10.0)
        self.results.grpc_error = error
        self.grpc_ok = error is None
        await self._wait_preloaded()
        await self.probe.connect(self.daemon.zmq_endpoint)
        await self.memory_phase()
        async with self.others("idle"):
            await self.latency_phase("idle")
        async with self.others("load"):
            await self.load_phase()
        if self.plan.ramp_rates:
            async with self.others("ramp"):
                await self.ramp_phase()
        if self.plan.large_fill:
            await self.large_fill_phase()

    async def close(self) -> None:
        self.probe.close()
        await self.clients.aclose()
        await self.scraper.aclose()

    # -- helpers ------------------------------------------------------------------------

    def _ours(self) -> float:
        return self.daemon.cpu_seconds() + self.publishers.cpu_seconds() + time.process_time()

    @contextlib.asynccontextmanager
    async def others(self, phase: str) -> AsyncIterator[None]:
        """Record the CPU other processes on the machine used during the block (in cores)."""
        start, busy, ours = time.perf_counter(), machine_busy_seconds(), self._ours()
        yield
        elapsed = time.perf_counter() - start
        others = (machine_busy_seconds() - busy) - (self._ours() - ours)
        self.results.others_cpu[phase] = max(0.0, others) / elapsed

    def entries(self, snapshot: Snapshot) -> float:
        """Index entries at ``snapshot``: the blocks gauge may lag (the Python data plane
        refreshes it once a second), so count from the last quiet reading plus the blocks
        applied since (real time)."""
        if self.entry_base is None:
            return snapshot.value("kv_cache_blocks")
        entries, events = self.entry_base
        return entries + (_applied(snapshot) - events) * BLOCKS_PER_EVENT

    async def wait_caught_up(self, limit: float = 15.0) -> float | None:
        """Seconds until the ingest buffer is (nearly) empty on two scrapes in a row, so one
        measurement does not inherit the backlog of the one before; None after ``limit``.

        While the load runs, the last applied batch of every pod must also be fresh (lag
        gauge < 5 ms): after an overload the backlog also waits in ZeroMQ's queues, which
        the buffer's frame count does not show.
        """
        start = time.perf_counter()
        calm = 0
        while time.perf_counter() - start < limit:
            snapshot = await self.scraper.scrape()
            depth = snapshot.value("kv_cache_ingest_buffer_frames")
            behind = self.loading and snapshot.max_value("kv_cache_event_lag_seconds") >= 0.005
            calm = calm + 1 if depth <= 8 and not behind else 0
            if calm == 2:
                return time.perf_counter() - start
            await asyncio.sleep(0.05)
        return None

    async def _wait_preloaded(self) -> None:
        self.progress.step("waiting for the 8 pods' prefixes of the query prompt")
        deadline = time.monotonic() + 20.0
        found: dict[str, int] = {}
        while time.monotonic() < deadline:
            found = await self.clients.rest_matches()
            if found == self.expected:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"preload not visible: {found} != {self.expected}")
        if self.grpc_ok:
            try:
                got, total_blocks = await self.clients.grpc_matches()
            except grpc.aio.AioRpcError as error:
                self.results.grpc_error = f"Locality failed: {error.code()} {error.details()}"
                self.grpc_ok = False
                return
            if got != self.expected or total_blocks != PROMPT_BLOCKS:
                self.results.grpc_error = f"Locality answered {got}"
                self.grpc_ok = False

    # -- memory -------------------------------------------------------------------------

    def _record_rss(self, label: str, blocks: float) -> None:
        rss, hwm = self.daemon.rss_bytes()
        self.results.memory.append({"entries": blocks, "rss": rss, "hwm": hwm})
        self.progress.step(f"{label}: {blocks:,.0f} entries, RSS {rss / 2**20:,.1f} MiB")

    async def memory_phase(self) -> None:
        await asyncio.sleep(1.1)  # the python plane refreshes the blocks gauge once a second
        first = await self.scraper.scrape()
        self._record_rss("after preload", first.value("kv_cache_blocks"))
        fill_blocks = 0
        fill_seconds = 0.0
        for target in self.plan.fill_targets:
            blocks, seconds = await self.fill_to(target)
            fill_blocks += blocks
            fill_seconds += seconds
        self.results.fill = {"blocks": fill_blocks, "seconds": fill_seconds}

    async def fill_to(self, target: int) -> tuple[int, float]:
        """Publish bursts until the index holds ``target`` entries, never more than two
        bursts ahead of what the daemon applied. Returns (blocks applied, seconds)."""
        self.progress.step(f"filling the index to {target:,} entries (as fast as it applies)")
        snapshot = await self.scraper.scrape()
        current = snapshot.value("kv_cache_blocks")
        per_batch = self.publishers.events_per_batch
        # A batch dropped (buffer full, in an earlier phase) is never applied.
        dropped = _dropped(snapshot) * per_batch
        applied = _applied(snapshot) + dropped
        n_pubs = len(self.publishers.conns)
        to_send = max(0, math.ceil((target - current) / BLOCKS_PER_EVENT))
        per_burst = 200  # events per publisher: 1,600 events = 51,200 blocks per burst
        window = 2 * per_burst * n_pubs  # well under the ingest buffer and ZeroMQ's HWMs
        expected = self.publishers.events_sent + self.probe.markers
        start = time.perf_counter()
        deadline = time.monotonic() + max(120.0, to_send * BLOCKS_PER_EVENT / 100_000)
        sent = 0
        shown = applied
        with self.progress.bar(to_send * BLOCKS_PER_EVENT, f"fill to {target:,}", "blk") as bar:
            while time.monotonic() < deadline:
                if sent < to_send and expected - applied < window:
                    n = min(per_burst, math.ceil((to_send - sent) / n_pubs))
                    self.publishers.send_all(("burst", math.ceil(n / per_batch)))
                    done = sum(int(r[1]) for r in await self.publishers.replies(30.0))
                    sent += done
                    expected += done
                applied = _applied(await self.scraper.scrape()) + dropped
                bar.advance(max(0.0, applied - shown) * BLOCKS_PER_EVENT)
                shown = max(shown, applied)
                bar.note(f"sent {sent * BLOCKS_PER_EVENT:,} blocks")
                if sent >= to_send and applied >= expected:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"fill to {target} did not finish: {applied} < {expected}")
        seconds = time.perf_counter() - start
        self.publishers.events_sent += sent
        # The gauge is a snapshot the daemon refreshes about once a second.
        blocks = current
        while time.monotonic() < deadline and blocks < target:
            await asyncio.sleep(0.2)
            blocks = (await self.scraper.scrape()).value("kv_cache_blocks")
        rate = sent * BLOCKS_PER_EVENT / seconds
        self._record_rss(f"filled in {seconds:.1f}s ({rate:,.0f} blocks/s)", blocks)
        return sent * BLOCKS_PER_EVENT, seconds

    # -- latency ------------------------------------------------------------------------

    async def cell(self, api: str, state: str, concurrency: int, total: int) -> None:
        call = self.clients.call(api)
        metric_api = "grpc" if api == "grpc" else "rest"
        # Every worker warms up (a raw connection idle past the server's keep-alive is
        # closed by it: the first call fails and reconnects, so it gets a second try).
        for i in range(max(self.plan.warmup, concurrency)):
            if not await call(i % concurrency):
                await call(i % concurrency)
        per_worker = total // concurrency
        latencies: list[float] = []
        errors = 0
        label = f"{api} {state} c={concurrency}"

        async def worker(number: int, bar: Bar) -> None:
            nonlocal errors
            clock = time.perf_counter
            for i in range(per_worker):
                began = clock()
                ok = await call(number)
                latencies.append(clock() - began)
                if not ok:
                    errors += 1
                if i % 8 == 7:
                    bar.advance(8)

        before = await self.scraper.scrape()
        gc.collect()
        gc.disable()  # the client's own collections are not the service's latency
        try:
            daemon_cpu, client_cpu = self.daemon.cpu_seconds(), time.process_time()
            with self.progress.bar(per_worker * concurrency, label, "req") as bar:
                start = time.perf_counter()
                await asyncio.gather(*(worker(n, bar) for n in range(concurrency)))
                seconds = time.perf_counter() - start
            daemon_cpu = self.daemon.cpu_seconds() - daemon_cpu
            client_cpu = time.process_time() - client_cpu
        finally:
            gc.enable()
        after = await self.scraper.scrape()
        service = after.buckets_since(before, QUERY, api=metric_api)
        lag = after.buckets_since(before, LAG)
        loaded = state != "idle"
        cell = Cell(
            api=api,
            state=state,
            concurrency=concurrency,
            requests=len(latencies),
            errors=errors,
            seconds=seconds,
            client_p50=quantile(latencies, 0.50),
            client_p99=quantile(latencies, 0.99),
            client_mean=statistics.fmean(latencies),
            client_max=max(latencies),
            service_p50=histogram_quantile(service, 0.50),
            service_p99=histogram_quantile(service, 0.99),
            daemon_cpu=daemon_cpu / len(latencies),
            client_cpu=client_cpu / len(latencies),
            lag_p50=histogram_quantile(lag, 0.50) if loaded else None,
            lag_p99=histogram_quantile(lag, 0.99) if loaded else None,
            entries=(self.entries(before), self.entries(after)),
            recovery=await self.wait_caught_up() if loaded else None,
        )
        self.results.cells.append(cell)
        self.progress.step(
            f"{label}: p50 {cell.client_p50 * 1e6:,.0f} us, p99 {cell.client_p99 * 1e6:,.0f} us,"
            f" {cell.rps:,.0f} req/s"
            + (f", lag p99 {format_ms(cell.lag_p99)}" if loaded else "")
            + (f", {errors} errors" if errors else "")
        )

    async def latency_phase(self, state: str) -> None:
        apis = ("grpc", "rest", "rest-raw") if self.grpc_ok else ("rest", "rest-raw")
        if not self.grpc_ok:
            self.progress.step(f"gRPC skipped: {self.results.grpc_error}")
        for api in apis:
            for concurrency in CONCURRENCY:
                await self.cell(api, state, concurrency, self.plan.requests[concurrency])
        count = self.plan.probes if state != "idle" else max(5, self.plan.probes // 2)
        probes = await self.probe.measure(state, count)
        self.results.probes.append(probes)
        self.progress.step(
            f"marker visible after p50 {format_ms(probes.p50)}, p99 {format_ms(probes.p99)}"
            f" (poll round trip {format_us(probes.poll_rtt)})"
        )
        if state != "idle":
            await self.wait_caught_up()

    # -- lag ----------------------------------------------------------------------------

    async def lag_window(self, name: str, seconds: float) -> None:
        """Lag of what is applied over ``seconds`` of load with no queries."""
        self.progress.step(f"{name}: {seconds:.0f}s of ingest, no queries")
        before = await self.scraper.scrape()
        await asyncio.sleep(seconds)
        after = await self.scraper.scrape()
        window = Window.between(name, before, after, (self.entries(before), self.entries(after)))
        self.results.windows.append(window)
        self.progress.step(f"{name}: lag p50 {format_ms(window.p50)}, p99 {format_ms(window.p99)}")

    # -- under load ---------------------------------------------------------------------

    async def load_phase(self) -> None:
        publishers = self.publishers
        n = len(publishers.conns)
        self.progress.step(
            f"starting the load: {n} publisher processes, {self.rate:,.0f} blocks/s in all"
            f" ({BLOCKS_PER_EVENT} blocks/event, {publishers.events_per_batch} event(s)/batch)"
        )
        await asyncio.sleep(1.1)  # a fresh blocks gauge: the base of the entry counts
        quiet = await self.scraper.scrape()
        self.entry_base = (quiet.value("kv_cache_blocks"), _applied(quiet))
        for i, conn in enumerate(publishers.conns):
            conn.send(("rate", self.rate / n, self.plan.load_max_seconds, i / n))
        load_start = time.perf_counter()
        self.loading = True
        try:
            await asyncio.sleep(self.plan.load_warmup)
            first_depth = len(self.scraper.buffer_frames)  # sampled from here on
            before = await self.scraper.scrape()
            cpu = (self.daemon.cpu_seconds(), publishers.cpu_seconds(), time.process_time())
            await self.lag_window("ingest only (start)", self.plan.ingest_window)
            await self.latency_phase("load")
            await self.lag_window("ingest only (end)", self.plan.ingest_window)
            after = await self.scraper.scrape()
            cpu_end = (self.daemon.cpu_seconds(), publishers.cpu_seconds(), time.process_time())
        finally:
            self.loading = False
            publishers.send_all(("stop",))
            replies = await publishers.replies(30.0)
        load_seconds = time.perf_counter() - load_start
        sent = sum(int(r[1]) for r in replies)
        publishers.events_sent += sent
        # Drain: how long until everything sent is applied or dropped (counted per batch).
        stopped = time.perf_counter()
        drained: float | None = None
        for _ in range(300):
            snapshot = await self.scraper.scrape()
            dropped = _dropped(snapshot)
            if _applied(snapshot) + dropped * publishers.events_per_batch >= (
                publishers.events_sent + self.probe.markers
            ):
                drained = time.perf_counter() - stopped
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        final = await self.scraper.scrape()  # gaps are seen when the frame after a drop is applied
        window = after.at - before.at
        depths = self.scraper.buffer_frames[first_depth:]

        def delta(name: str, end: Snapshot = after, **labels: str) -> float:
            return end.value(name, **labels) - before.value(name, **labels)

        events = delta("kv_cache_events_received_total", type="BlockStored")
        drops = delta("kv_cache_event_decode_errors_total", final, reason="buffer_full")
        self.results.ingest = {
            "offered_blocks_per_s": sent * BLOCKS_PER_EVENT / load_seconds,
            "window_seconds": window,
            "applied_blocks_per_s": events * BLOCKS_PER_EVENT / window,
            "applied_events_per_s": events / window,
            "batches_per_s": delta("kv_cache_batches_received_total") / window,
            "daemon_cpu": (cpu_end[0] - cpu[0]) / window,
            "publishers_cpu": (cpu_end[1] - cpu[1]) / window,
            "client_cpu": (cpu_end[2] - cpu[2]) / window,
            "buffer_frames_max_sampled": max(depths, default=0.0),
            "buffer_frames_samples": len(depths),
            "buffer_full_drops": drops,
            "other_skips": delta("kv_cache_event_decode_errors_total", final) - drops,
            "sequence_gaps": delta("kv_cache_sequence_gaps_total", final),
            "lost_batches": delta("kv_cache_lost_batches_total", final),
            "publisher_skips": sum(int(r[2]) for r in replies),
            "drain_seconds": -1.0 if drained is None else drained,
            "entries_start": self.entries(before),
            "entries_end": self.entries(after),
        }
        self.results.windows.append(
            Window.between(
                "whole load (queries included)",
                before,
                after,
                (self.results.ingest["entries_start"], self.results.ingest["entries_end"]),
            )
        )
        await asyncio.sleep(1.1)
        rss, hwm = self.daemon.rss_bytes()
        blocks = (await self.scraper.scrape()).value("kv_cache_blocks")
        self.results.memory.append({"entries": blocks, "rss": rss, "hwm": hwm})
        ingest = self.results.ingest
        self.progress.step(
            f"load done: applied {ingest['applied_blocks_per_s']:,.0f} blocks/s,"
            f" {ingest['buffer_full_drops']:.0f} dropped"
        )

    # -- ingest ramp --------------------------------------------------------------------

    async def ramp_phase(self) -> None:
        """Offer more and more blocks/s until the visible lag p99 passes the threshold or
        the daemon stops keeping up; the highest rate it sustained is the result."""
        rates = self.plan.ramp_rates
        threshold = self.results.ramp_lag_threshold
        self.progress.step(
            f"ingest ramp: {', '.join(f'{r / 1e3:,.0f}k' for r in rates)} blocks/s offered,"
            f" until lag p99 > {threshold * 1e3:g} ms or the daemon falls behind"
        )
        await self.wait_caught_up()
        limit = 0.8 * self.results.max_size
        with self.progress.bar(len(rates), "ramp", "step") as bar:
            for target in rates:
                entries = self.entries(await self.scraper.scrape())
                if entries + target * (self.plan.ramp_warmup + self.plan.ramp_window) > limit:
                    self.progress.step(f"ramp stopped: the index would pass {limit:,.0f} entries")
                    break
                bar.note(f"{target / 1e3:,.0f}k blocks/s")
                for attempt in (1, 2):
                    step = await self.ramp_step(target, threshold)
                    # A single stall can push one 3 s step's p99 past the threshold while the
                    # daemon keeps up: such a step is tried once more before the ramp ends.
                    retry = attempt == 1 and not step.sustained and step.why.startswith("lag")
                    retry = retry and "; " not in step.why
                    if retry:
                        step.why += " (tried again)"
                    self.results.ramp.append(step)
                    self.progress.step(
                        f"ramp {target / 1e3:,.0f}k: offered {step.offered:,.0f}, applied"
                        f" {step.applied:,.0f} blocks/s, lag p99 {format_ms(step.lag_p99)},"
                        f" daemon {step.daemon_cpu:.0%} of a core"
                        + (f" -- {step.why}" if step.why else "")
                    )
                    if not retry:
                        break
                bar.advance()
                if not step.sustained or step.why:
                    break
        sustained = [s.offered for s in self.results.ramp if s.sustained]
        self.results.ramp_sustained = max(sustained, default=None)

    async def ramp_step(self, target: float, threshold: float) -> RampStep:
        publishers = self.publishers
        n = len(publishers.conns)
        total = self.plan.ramp_warmup + self.plan.ramp_window
        for i, conn in enumerate(publishers.conns):
            conn.send(("rate", target / n, total, i / n))
        await asyncio.sleep(self.plan.ramp_warmup)
        before = await self.scraper.scrape()
        cpu = (self.daemon.cpu_seconds(), publishers.cpu_seconds())
        await asyncio.sleep(self.plan.ramp_window)
        after = await self.scraper.scrape()
        cpu_end = (self.daemon.cpu_seconds(), publishers.cpu_seconds())
        replies = await publishers.replies(30.0)
        sent = sum(int(r[1]) for r in replies)
        publishers.events_sent += sent
        drain = await self.wait_caught_up(10.0)
        final = await self.scraper.scrape()
        window = after.at - before.at
        lag = after.buckets_since(before, LAG)
        offered = sent * BLOCKS_PER_EVENT / total
        applied = (_applied(after) - _applied(before)) * BLOCKS_PER_EVENT / window
        drops = _dropped(final) - _dropped(before)
        lag_p99 = histogram_quantile(lag, 0.99)
        why: list[str] = []
        if lag_p99 is None or lag_p99 > threshold:
            why.append(f"lag p99 {format_ms(lag_p99)} > {threshold * 1e3:g} ms")
        if applied < 0.95 * offered:
            why.append(f"applied {applied / offered:.0%} of the offered rate")
        if drops:
            why.append(f"{drops:,.0f} batches dropped (ingest buffer full)")
        if drain is None:
            why.append("backlog not drained 10 s after the step")
        sustained = not why
        if sustained and offered < 0.9 * target:
            why.append(f"the publishers offered only {offered / target:.0%} of the target")
        return RampStep(
            target=target,
            offered=offered,
            applied=applied,
            seconds=window,
            batches=lag[-1][1] if lag else 0.0,
            lag_p50=histogram_quantile(lag, 0.50),
            lag_p99=lag_p99,
            lag_max_bucket=_top_bucket(lag),
            buffer_full_drops=drops,
            publisher_skips=sum(int(r[2]) for r in replies),
            drain=drain,
            daemon_cpu=(cpu_end[0] - cpu[0]) / window,
            publishers_cpu=(cpu_end[1] - cpu[1]) / window,
            entries=(self.entries(before), self.entries(after)),
            sustained=sustained,
            why="; ".join(why),
        )

    # -- memory at 10M entries ----------------------------------------------------------

    async def large_fill_phase(self) -> None:
        """Fill the index to ``LARGE_FILL`` entries as fast as the daemon applies; RSS."""
        await self.wait_caught_up()
        await asyncio.sleep(1.1)  # a fresh blocks gauge
        current = (await self.scraper.scrape()).value("kv_cache_blocks")
        if current >= LARGE_FILL:
            self._record_rss("already past the large fill", current)
            return
        blocks, seconds = await self.fill_to(LARGE_FILL)
        self.results.fill_large = {"blocks": blocks, "seconds": seconds}
