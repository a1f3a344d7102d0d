"""Benchmark: what a gRPC query costs on this machine before any index work, and how other
CPU work on the server's core moves it.

Run: ``.venv/bin/python -m loadtest.bench_grpc_floor [--share 0.25] [--requests 4000]``

A ``grpc.aio`` server on uvloop answers ``KVCacheService/Locality`` with a prebuilt 8-pod
answer after ``--handler-us`` of CPU (the daemon's own query work is ~150 us), pinned to the
last CPU as the service benchmark pins the daemon; a synchronous client on the other CPUs
sends the 8192-token packed request ``--requests`` times and reports p50/p90/p99.

The same server is then run with background work that needs ``--share`` of its core, as
ingestion does, done four ways:
- ``loop``: in the server's event loop, in 0.5 ms slices (the daemon's design);
- ``loop-steps``: in the loop, one 60 us step per loop iteration;
- ``thread``: in a thread of the server at nice 19, releasing the GIL after each 60 us step;
- ``process``: in another process on the same core at nice 0.
Each line also reports the share the background work achieved: below ``--share`` it fell
behind (for ingestion: lag that grows). See docs/performance.md, "Session 11".

No asserts: figures vary with the machine; the point is the comparison within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc

from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from tests.e2e.harness import free_port

MODES = ("none", "loop", "loop-steps", "thread", "process")
STEP = 60e-6
SLICE = 500e-6


def burn(seconds: float) -> None:
    """Keep the CPU busy in Python bytecode (holding the GIL, as decoding and keying do)."""
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        for i in range(20):
            total += i


class _Debt:
    """Background work owed: ``share`` of the wall clock since the start, minus work done."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.start = self.last = time.perf_counter()
        self.owed = 0.0
        self.done = 0.0

    def accrue(self) -> float:
        now = time.perf_counter()
        self.owed += (now - self.last) * self.share
        self.last = now
        return self.owed

    def pay(self, seconds: float) -> None:
        burn(seconds)
        self.owed -= seconds
        self.done += seconds

    def achieved(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.start)


def _answer() -> kvcache_pb2.LocalityResponse:
    return kvcache_pb2.LocalityResponse(
        model="m",
        block_size=16,
        total_blocks=512,
        cache_hits=300,
        coverage=300 / 512,
        pods=[
            kvcache_pb2.PodLocality(
                pod_id=f"10.0.0.{i}:8000",
                match_length=300,
                matched_tokens=4800,
                block_count=300,
                tiers={"gpu": 300},
                score=300 / 512,
            )
            for i in range(8)
        ],
    )


def _locality_handler(handler_seconds: float) -> grpc.GenericRpcHandler:
    """``KVCacheService/Locality`` alone, answering the prebuilt answer."""
    answer = _answer()

    async def locality(request: kvcache_pb2.LocalityRequest, context: object) -> object:
        burn(handler_seconds)
        return answer

    method = grpc.unary_unary_rpc_method_handler(
        locality,
        request_deserializer=kvcache_pb2.LocalityRequest.FromString,
        response_serializer=kvcache_pb2.LocalityResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("kvcache.v1.KVCacheService", {"Locality": method})


async def _in_loop(debt: _Debt, budget: float) -> None:
    while True:
        if debt.accrue() < STEP:
            await asyncio.sleep(0.001)
            continue
        spent = 0.0
        while spent < budget and debt.owed >= STEP:
            debt.pay(STEP)
            spent += STEP
        await asyncio.sleep(0)


def _pay_forever(debt: _Debt, *, in_server: bool) -> None:
    """The background work outside the loop: in a nice-19 thread of the server, which lets
    go of the GIL after each step, or in a process of its own (nice 0)."""
    if in_server:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while True:
        if debt.accrue() < STEP:
            time.sleep(0.001)
            continue
        while debt.owed >= STEP:
            debt.pay(STEP)
            if in_server:
                time.sleep(0)  # lets a waiting event loop thread take the GIL


async def _serve(
    port: int, mode: str, share: float, handler_seconds: float, switch_interval: float
) -> None:
    sys.setswitchinterval(switch_interval)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_locality_handler(handler_seconds),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    debt = _Debt(share)
    background = None  # a reference keeps the task alive
    if mode in ("loop", "loop-steps"):
        background = asyncio.create_task(_in_loop(debt, SLICE if mode == "loop" else STEP))
    elif mode == "thread":
        thread = threading.Thread(target=_pay_forever, args=(debt,), kwargs={"in_server": True})
        thread.daemon = True
        thread.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=None)
    if background is not None:
        background.cancel()
    if mode in ("loop", "loop-steps", "thread"):
        print(f"{debt.achieved():.4f}", flush=True)  # the share achieved, for the client


def _spawn(args: list[str], cpus: set[int]) -> subprocess.Popen[bytes]:
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        command = [sys.executable, "-m", "loadtest.bench_grpc_floor", *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE)
    finally:
        os.sched_setaffinity(0, mine)


def _measure(port: int, requests: int) -> list[float]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=15)
    stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
    request = kvcache_pb2.LocalityRequest(model="m", token_ids_packed=bytes(8192 * 4))
    for _ in range(300):
        stub.Locality(request, timeout=5)
    latencies = []
    for _ in range(requests):
        began = time.perf_counter()
        stub.Locality(request, timeout=5)
        latencies.append(time.perf_counter() - began)
    channel.close()
    return sorted(latencies)


def run_mode(mode: str, share: float, requests: int, handler_us: float, switch: float) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpus = {cpus[-1]}, set(cpus[:-1]) or {cpus[-1]}
    port = free_port()
    server = _spawn(
        ["--serve", str(port), mode, str(share), str(handler_us), str(switch)], server_cpu
    )
    burner = _spawn(["--burn", str(share)], server_cpu) if mode == "process" else None
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client_cpus)
    achieved = None
    try:
        latencies = _measure(port, requests)
        server.terminate()
        reported = server.communicate(timeout=10)[0].decode().strip()
        achieved = float(reported) if reported else None
    finally:
        os.sched_setaffinity(0, mine)
        for process in (server, burner):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def at(q: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e6:,.0f} us"

    background = "no background work" if mode == "none" else f"background {share:.0%} ({mode})"
    line = f"{background}: p50 {at(0.5)}, p90 {at(0.9)}, p99 {at(0.99)}"
    if achieved is not None:
        line += f"; background achieved {achieved:.0%}"
    return line


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        import uvloop

        port, mode, share, handler_us, switch = sys.argv[2:7]
        uvloop.run(_serve(int(port), mode, float(share), float(handler_us) / 1e6, float(switch)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--burn":
        _pay_forever(_Debt(float(sys.argv[2])), in_server=False)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--share", type=float, default=0.25, help="background share of a core")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--handler-us", type=float, default=150.0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=sys.getswitchinterval(),
        help="the server's sys.setswitchinterval (s): how long a thread waits for the GIL"
        " before it asks the holder to let go",
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    for mode in modes:
        line = run_mode(mode, args.share, args.requests, args.handler_us, args.switch_interval)
        print(line, flush=True)


if __name__ == "__main__":
    main()
