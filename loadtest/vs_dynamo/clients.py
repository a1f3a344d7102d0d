"""Query clients and latency cells.

One HTTP client for both HTTP servers: a minimal keep-alive HTTP/1.1 client on a blocking
socket (the request bytes prepared once; the answer read by Content-Length and decoded with
``json.loads``, as a scheduler would), so the client costs both servers the same and next to
nothing. gRPC goes through ``service.client.KVCacheClient`` (packed token ids), as a
scheduler plugin would call it.

A cell is ``concurrency`` client processes (spawned: each has its own GIL), each with one
connection, started together after a warm-up and run for a number of requests or seconds,
whichever comes first; latencies are per request, wall clock, from the client's side.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import socket
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from loadtest.vs_dynamo import ours
from loadtest.vs_dynamo.indexers import HttpQuery
from loadtest.vs_dynamo.workload import MODEL

__all__ = ["Cell", "RawHttp", "Target", "percentile", "read_response", "run_cell"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def read_response(stream: Any) -> tuple[int, bytes]:
    """Read one HTTP/1.1 answer (status line, headers, Content-Length body) from a binary
    file object; (status, body)."""
    status_line = stream.readline(65536)
    if not status_line:
        raise ConnectionError("connection closed")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    length: int | None = None
    while True:
        line = stream.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked answers are not supported by this client")
    if length is None:
        raise ValueError("answer without Content-Length")
    body = stream.read(length)
    if len(body) != length:
        raise ConnectionError("connection closed mid-answer")
    return int(parts[1]), body


class RawHttp:
    """A keep-alive HTTP/1.1 client on one blocking socket to 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port, self.timeout = port, timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    @staticmethod
    def request(path: str, payload: Any) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def send(self, request: bytes) -> Any:
        """Send a prepared request; the decoded JSON answer (``RuntimeError`` unless 200)."""
        if self._sock is None:
            self._sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._file = self._sock.makefile("rb", buffering=262144)
        try:
            self._sock.sendall(request)
            status, body = read_response(self._file)
        except (OSError, ValueError):
            self.close()  # a fresh connection next time
            raise
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None


@dataclass(frozen=True)
class Target:
    """What a client asks: ``api`` is ``http`` (``query`` set) or ``grpc`` (``grpc_target``)."""

    label: str  # e.g. "dynamo-http", "ours-rest", "ours-grpc"
    api: str
    token_ids: tuple[int, ...]
    query: HttpQuery | None = None
    grpc_target: str | None = None


class _Caller:
    """One connection of one client process; ``__call__`` is one query."""

    def __init__(self, target: Target) -> None:
        self.target = target
        if target.api == "grpc":
            # Imported here: the HTTP clients' processes need no grpc.
            from service.client import KVCacheClient

            assert target.grpc_target is not None
            self._grpc = KVCacheClient(target.grpc_target, timeout=10.0)
            self._tokens = list(target.token_ids)
            self._grpc.models(timeout=10.0)  # connects the channel
        else:
            assert target.query is not None
            self._http = RawHttp(target.query.port)
            self._request = RawHttp.request(target.query.path, target.query.body(target.token_ids))

    def __call__(self) -> Any:
        if self.target.api == "grpc":
            return self._grpc.locality(MODEL, self._tokens)
        return self._http.send(self._request)

    def matches(self) -> dict[int, int]:
        """pod -> match length for the target's prompt."""
        answer = self()
        if self.target.api == "grpc":
            return ours.grpc_matches(answer)
        assert self.target.query is not None
        return self.target.query.matches(answer)

    def close(self) -> None:
        if self.target.api == "grpc":
            self._grpc.close()
        else:
            self._http.close()


def ask(target: Target) -> dict[int, int]:
    """One query from this process: pod -> match length."""
    caller = _Caller(target)
    try:
        return caller.matches()
    finally:
        caller.close()


def _client_main(
    target: Target,
    warmup: int,
    requests: int,
    seconds: float,
    start: Event,
    conn: Connection,
) -> None:
    try:
        caller = _Caller(target)
        for _ in range(warmup):
            caller()
    except Exception as error:  # reported to the parent, which fails the cell
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", None))
    latencies = array("d")
    errors = 0
    first = last = time.perf_counter()
    if start.wait(120):
        first = time.perf_counter()
        deadline = first + seconds
        while len(latencies) < requests:
            began = time.perf_counter()
            if began >= deadline:
                break
            try:
                caller()
            except Exception:  # counted; a query error must not end the cell
                errors += 1
                continue
            last = time.perf_counter()
            latencies.append(last - began)
    caller.close()
    conn.send(("done", (latencies.tobytes(), errors, last - first)))


@dataclass(frozen=True)
class Cell:
    """One latency cell's result; times in ms, throughput in queries per second."""

    label: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    qps: float


def run_cell(
    target: Target, *, concurrency: int, requests: int, seconds: float, warmup: int = 20
) -> Cell:
    """Run ``concurrency`` client processes against ``target``, each for ``requests``
    requests or ``seconds`` (whichever first); merged latencies, total throughput."""
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    pipes, processes = [], []
    try:
        for n in range(concurrency):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=_client_main,
                args=(target, warmup, requests, seconds, start, child),
                name=f"client-{target.label}-{n}",
                daemon=True,
            )
            process.start()
            child.close()
            pipes.append(parent)
            processes.append(process)
        for pipe in pipes:
            kind, value = _receive(pipe, 120.0, "start")
            if kind == "error":
                raise RuntimeError(f"{target.label} client: {value}")
        start.set()
        latencies: list[float] = []
        errors, wall = 0, 0.0
        for pipe in pipes:
            _, (raw, failed, active) = _receive(pipe, seconds + 120.0, "finish")
            values = array("d")
            values.frombytes(raw)
            latencies.extend(values)
            errors += failed
            wall = max(wall, active)  # the clients ran side by side
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        for pipe in pipes:
            pipe.close()
    return Cell(
        label=target.label,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=wall,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        qps=len(latencies) / wall if wall > 0 else math.nan,
    )


def _receive(pipe: Connection, timeout: float, what: str) -> tuple[str, Any]:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a client did not {what} within {timeout:.0f} s")
    kind, value = pipe.recv()
    return str(kind), value
