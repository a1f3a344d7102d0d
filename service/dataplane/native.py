"""The native data plane (native/plane.hpp), driven from the event loop.

The C++ side receives, decodes, sequences, keys and indexes on threads of its own, without
the GIL; lookups run natively with the GIL released. This side is the control plane: it
configures sockets, turns the plane's notices (a stream seen, a gap, a replay to fetch...)
into logs and replay fetches, and reads counters and stream snapshots when asked. It works
per batch or per notice, never per block.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Sequence
from typing import Any

import structlog

from service.config import Settings
from service.dataplane.protocol import DataPlaneKind, Lookup, PlaneCounts
from service.dataplane.registry import StreamSnapshot, pod_statuses, stream_warnings
from service.dataplane.replays import ReplayRunner
from service.events.model import Tier
from service.events.replay import ReplayedBatch
from service.events.subscriber import Frame, PodEndpoint
from service.index.keys import DEFAULT_MAX_PARENTS, TOKEN_TYPECODE
from service.index.protocol import PodRank
from service.scoring import PodScore
from service.status import ModelStatus, PodStatus
from service.telemetry import LATENCY_BUCKETS

__all__ = ["NativeDataPlane"]

log = structlog.get_logger("kv_cache.ingest")

_TIER_LABELS = tuple(tier.label for tier in Tier)
# Frames queued inside ZeroMQ per socket before our receiving thread takes them; that
# thread only drains, so this is slack for scheduling hiccups, not a buffer.
_RECEIVE_HWM = 100_000
_DRAIN_SECONDS = 1.0


class NativeDataPlane:
    """``DataPlane`` over ``service._dataplane.DataPlane``."""

    def __init__(self, settings: Settings, replays: ReplayRunner | None) -> None:
        from service import _dataplane  # the build is required; no silent fallback

        zmq = settings.zmq
        weights = settings.scoring.tier_weights
        self._settings = settings
        self._plane = _dataplane.DataPlane(
            ttl=settings.index.ttl,
            max_entries=settings.index.max_size,
            max_engine_hashes=settings.index.max_size,
            max_parents=DEFAULT_MAX_PARENTS,
            buffer_bytes=zmq.buffer_bytes,
            topic_filter=zmq.topic_filter,
            max_frame_bytes=zmq.max_frame_bytes,
            receive_hwm=_RECEIVE_HWM,
            replay=replays is not None,
            replay_endpoints={
                pod.pod_id: pod.replay_endpoint for pod in zmq.pods if pod.replay_endpoint
            },
            lag_buckets=list(LATENCY_BUCKETS),
            weights=[weights.gpu, weights.cpu, weights.disk],
        )
        for model in settings.models:
            self._plane.configure_model(
                model.name, model.key_mode, model.hash_algorithm, model.hash_seed
            )
        self._replays = replays
        self._hash_mismatch_logged: set[str] = set()
        self._reading = False

    @property
    def kind(self) -> DataPlaneKind:
        return "native"

    @property
    def failure(self) -> str | None:
        return None  # the plane's threads do not die: a bad frame is counted and skipped

    # -- sockets ----------------------------------------------------------------------

    def bind(self, endpoint: str, data_parallel_size: int) -> list[str]:
        try:
            bound: list[str] = self._plane.bind(endpoint, data_parallel_size)
        except (RuntimeError, ValueError) as error:
            raise OSError(str(error)) from error
        log.info("zmq bound", endpoints=bound, topic_filter=self._settings.zmq.topic_filter)
        return bound

    def connect(self, pod: PodEndpoint) -> None:
        self._plane.connect(
            pod.pod_id,
            pod.endpoint,
            pod.replay_endpoint or "",
            pod.model or "",
            pod.data_parallel_size,
        )
        log.info(
            "zmq connected to pod",
            pod=pod.pod_id,
            endpoint=pod.endpoint,
            replay_endpoint=pod.replay_endpoint,
            data_parallel_size=pod.data_parallel_size,
        )

    def disconnect(self, pod_id: str) -> None:
        self._plane.disconnect(pod_id)

    async def forget_pod(self, pod_id: str) -> None:
        self._plane.forget_pod(pod_id, time.time())

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._plane.start()
        asyncio.get_running_loop().add_reader(self._plane.notice_fd(), self._read_notices)
        self._reading = True

    async def stop(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._plane.notice_fd())
            self._reading = False
        if self._replays is not None:
            await self._replays.close()
        # Releases the GIL while the applier drains; the loop has nothing left to serve.
        self._plane.stop(_DRAIN_SECONDS)
        self._read_notices()

    async def ingest_frame(self, frame: Frame) -> None:
        source = frame.source
        self._plane.apply_frame_for_test(
            frame.topic,
            frame.seq,
            frame.payload,
            source.pod_id or "",
            source.model or "",
            source.rank,
            source.replay_endpoint or "",
            frame.received,
        )
        self._read_notices()

    def freeze_clock(self, seconds: float) -> None:
        """Tests: the index stamps and expires by this monotonic time from now on."""
        self._plane.set_clock_for_test(seconds)

    # -- notices ----------------------------------------------------------------------

    def _read_notices(self) -> None:
        for notice in self._plane.take_notices():
            try:
                self._on_notice(*notice)
            except Exception:
                log.exception("notice not handled", notice=notice[0])

    def _on_notice(
        self,
        kind: str,
        stream: int,
        pod_id: str,
        rank: int,
        model: str,
        text: bytes,
        seq: int,
        other: int,
    ) -> None:
        pod = str(PodRank(pod_id, rank))
        if kind == "stream_seen":
            log.info("pod seen", pod=pod, model=model, seq=seq)
        elif kind == "model_changed":
            log.warning("pod changed model", pod=pod, old=text.decode(), new=model)
        elif kind == "gap":
            log.warning("sequence gap", pod=pod, expected=seq, got=other)
        elif kind == "restart":
            log.warning("engine restarted", pod=pod, last_seq=seq, seq=other)
        elif kind == "replay":
            self._replay(stream, pod, text.decode(), seq)
        elif kind == "unidentified":
            log.warning(
                "batch names no pod or model; dropped",
                topic=text.decode("utf-8", "replace"),
                hint="set the engine's topic to kv@<pod-ip:port>@<model>, or list the pod"
                " under zmq.pods",
            )
        elif kind == "hash_mismatch":
            log.error(
                "engine block hashes differ from ours",
                model=model,
                pod=pod,
                key_mode="vllm",
                likely_cause="hash_algorithm or hash_seed (PYTHONHASHSEED) differ from"
                " the engine's; or the engine's vLLM version hashes differently",
            )
        elif kind == "overflow":
            log.warning(
                "ingest buffer full: frames dropped",
                pod=pod_id,
                buffer_bytes=self._settings.zmq.buffer_bytes,
                hint="the pod is replayed where it has a replay endpoint; raise"
                " zmq.buffer_bytes if bursts outgrow it",
            )

    def _replay(self, stream: int, pod: str, endpoint: str, start_seq: int) -> None:
        if self._replays is None:
            self._plane.replay_done(stream, [], False)
            return

        def done(batches: list[ReplayedBatch], ok: bool) -> None:
            self._plane.replay_done(stream, [(b.seq, b.payload) for b in batches], ok)

        self._replays.start(pod, endpoint, start_seq, done)

    # -- lookups ----------------------------------------------------------------------

    async def lookup(
        self,
        model: str,
        *,
        token_ids: Sequence[int] | None = None,
        block_hashes: Sequence[int] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Lookup:
        if token_ids is not None:
            tokens = token_ids
            if not (isinstance(tokens, array) and tokens.itemsize == 4):
                tokens = array(TOKEN_TYPECODE, tokens)
            _, block_size, keys, pods = self._plane.locality_tokens(
                model, tokens, lora_name, cache_salt
            )
            total = keys
        else:
            hashes = array("Q", block_hashes or ())
            _, block_size, _, pods = self._plane.locality_hashes(model, hashes)
            total = len(hashes)
        return Lookup(block_size, total, [_pod_score(*pod) for pod in pods])

    def block_size(self, model: str) -> int | None:
        size: int | None = self._plane.block_size(model)
        return size

    # -- the gRPC front ------------------------------------------------------------------

    def serve_grpc(
        self, address: str, backend: str, *, max_message_bytes: int, max_tokens: int
    ) -> int:
        """Serves the gRPC port natively (native/grpc_front.hpp): the hot path answered from
        the plane, every other call relayed to the Python server at ``backend``. Returns the
        bound port; ``OSError`` when ``address`` cannot be bound."""
        try:
            port: int = self._plane.serve_grpc(
                address, backend, max_message_bytes, max_tokens, list(LATENCY_BUCKETS)
            )
        except RuntimeError as error:
            raise OSError(str(error)) from error
        return port

    def stop_grpc(self, grace: float) -> None:
        """Stops the front; calls in flight get ``grace`` seconds."""
        self._plane.stop_grpc(grace)

    def grpc_counts(self) -> dict[str, Any]:
        """The front's query latencies and counts (``Metrics.watch_native_queries``)."""
        counts: dict[str, Any] = self._plane.grpc_counts()
        return counts

    # -- the HTTP front ------------------------------------------------------------------

    def serve_http(
        self, host: str, port: int, backend: str, *, max_body_bytes: int, max_tokens: int
    ) -> int:
        """Serves the HTTP port natively (native/http_front.hpp): the REST hot path answered
        from the plane, every other request's connection handed to the Python server at the
        unix socket ``backend``. Returns the bound port; ``OSError`` when it cannot bind."""
        try:
            bound: int = self._plane.serve_http(
                host, port, backend, max_body_bytes, max_tokens, list(LATENCY_BUCKETS)
            )
        except RuntimeError as error:
            raise OSError(str(error)) from error
        return bound

    def stop_http(self, grace: float) -> None:
        """Stops the HTTP front; open connections get ``grace`` seconds."""
        self._plane.stop_http(grace)

    def http_counts(self) -> dict[str, Any]:
        """The HTTP front's query latencies and counts."""
        counts: dict[str, Any] = self._plane.http_counts()
        return counts

    # -- status -----------------------------------------------------------------------

    def _snapshots(self) -> list[StreamSnapshot]:
        return [
            StreamSnapshot(
                pod_id=s["pod_id"],
                dp_rank=s["rank"],
                model=s["model"],
                blocks=s["blocks"],
                replaying=s["replaying"],
                resync=s["resync"],
                last_seq=s["last_seq"],
                last_time=s["last_time"],
                lag=s["lag"],
                batches=s["batches"],
                gaps=s["gaps"],
                lost=s["lost"],
                replays=s["replays"],
                restarts=s["restarts"],
                dropped=s["dropped"],
            )
            for s in self._plane.streams()
        ]

    def streams(self) -> list[StreamSnapshot]:
        return self._snapshots()

    async def pods(self) -> list[PodStatus]:
        return pod_statuses(
            self._snapshots(), stale_after=self._settings.zmq.stale_after, now=time.time()
        )

    async def models(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                name=m["name"],
                key_mode=m["key_mode"],
                configured=m["configured"],
                block_size=m["block_size"],
                blocks=m["blocks"],
                pods=m["pods"],
                hash_matches=m["hash_matches"],
                hash_mismatches=m["hash_mismatches"],
            )
            for m in sorted(self._plane.models(), key=lambda m: str(m["name"]))
        ]

    def warnings(self) -> list[str]:
        warnings = [
            f"model {m['name']!r}: {m['hash_mismatches']} engine block hashes differ from ours"
            " (check hash_algorithm and hash_seed / PYTHONHASHSEED)"
            for m in sorted(self._plane.models(), key=lambda m: str(m["name"]))
            if m["hash_mismatches"]
        ]
        return warnings + stream_warnings(self._snapshots())

    def counts(self) -> PlaneCounts:
        c: dict[str, Any] = self._plane.counts()
        return PlaneCounts(
            events=c["events"],
            drops=c["drops"],
            batches={"live": c["batches_live"], "replay": c["batches_replay"]},
            lag_buckets=LATENCY_BUCKETS,
            lag_counts=tuple(c["lag_counts"]),
            lag_sum=c["lag_sum"],
            buffer_bytes=c["inbox_bytes"],
            buffer_frames=c["inbox_frames"],
            buffer_max_bytes=c["inbox_max_bytes"],
            entries=c["entries"],
            evictions=c["evictions"],
            dropped_by_pod=c["dropped_by_pod"],
            hash_mismatches={
                m["name"]: m["hash_mismatches"]
                for m in self._plane.models()
                if m["hash_mismatches"]
            },
        )


def _pod_score(
    pod_id: str,
    rank: int,
    match_length: int,
    block_count: int,
    gpu: int,
    cpu: int,
    disk: int,
    score: float,
) -> PodScore:
    tiers = {label: n for label, n in zip(_TIER_LABELS, (gpu, cpu, disk), strict=True) if n}
    return PodScore(PodRank(pod_id, rank), match_length, block_count, tiers, score)
