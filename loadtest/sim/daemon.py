"""The real kv-cache daemon, run as a subprocess on 127.0.0.1 for the simulated engines.

It starts ``python -m service serve`` in connect mode: one ``zmq.pods`` entry per engine,
with its PUB and replay ROUTER endpoints, bind mode off. Queries go over gRPC
(``kvcache.v1.KVCacheService``, the generated stubs), as a scheduler would send them.
``wait_applied`` is how the simulator keeps the daemon's view in step with simulated time:
it polls ``ListPods`` until every engine's ``last_seq`` has reached what it published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
import grpc.aio
import httpx

from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc

if TYPE_CHECKING:
    from service.api.generated.kvcache.v1.kvcache_pb2_grpc import KVCacheServiceAsyncStub

__all__ = ["Daemon", "DaemonError", "PodEndpoints"]

ROOT = Path(__file__).resolve().parents[2]
CATCH_UP_SECONDS = 30.0
"""Longest wait for the daemon to apply what was published (real seconds)."""
_START_SECONDS = 30.0
_STOP_SECONDS = 10.0


class DaemonError(RuntimeError):
    """The daemon could not be started, or did not keep up; the message has its log tail."""


@dataclass(frozen=True, slots=True)
class PodEndpoints:
    pod_id: str
    endpoint: str
    replay_endpoint: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    """A ``kv-cache serve`` subprocess connected to ``pods``; use ``async with``."""

    def __init__(self, pods: Sequence[PodEndpoints], *, log_level: str = "warning") -> None:
        self.http_port = _free_port()
        self.grpc_port = _free_port()
        config = {
            "api": {"host": "127.0.0.1", "port": self.http_port},
            "grpc": {"host": "127.0.0.1", "port": self.grpc_port},
            "zmq": {
                "endpoint": "",
                "pods": [
                    {
                        "pod_id": pod.pod_id,
                        "endpoint": pod.endpoint,
                        "replay_endpoint": pod.replay_endpoint,
                    }
                    for pod in pods
                ],
            },
            "logging": {"level": log_level, "format": "json"},
        }
        self._dir = tempfile.TemporaryDirectory(prefix="kv-cache-sim-")
        self._config = Path(self._dir.name) / "config.yaml"
        self._config.write_text(json.dumps(config))  # JSON is YAML
        self._log: IO[bytes] = open(Path(self._dir.name) / "stderr.log", "w+b")  # noqa: SIM115
        self._process: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: KVCacheServiceAsyncStub | None = None

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the daemon; return when it is ready (``/readyz``) and gRPC is open."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_CACHE_")}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            "--config",
            str(self._config),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log,
        )
        try:
            async with asyncio.timeout(_START_SECONDS):
                await self._wait_ready(self._process)
        except TimeoutError:
            raise DaemonError(f"daemon not ready after {_START_SECONDS}s\n{self.logs()}") from None
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self._stub = kvcache_pb2_grpc.KVCacheServiceStub(self._channel)

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if process.returncode is not None:
                    raise DaemonError(f"daemon exited {process.returncode}\n{self.logs()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.05)

    @property
    def stub(self) -> KVCacheServiceAsyncStub:
        if self._stub is None:
            raise DaemonError("daemon not started")
        return self._stub

    async def match_lengths(self, model: str, token_ids: Sequence[int]) -> dict[str, int]:
        """pod_id -> blocks of the prompt's prefix it holds, for pods holding any."""
        answer = await self.stub.GetCandidates(
            kvcache_pb2.LocalityRequest(model=model, token_ids=token_ids)
        )
        return {c.pod: c.match_length for c in answer.candidates}

    async def wait_applied(self, targets: Mapping[str, int]) -> None:
        """Return once every pod's ``last_seq`` is at least its target.

        Raises ``DaemonError`` if that takes over ``CATCH_UP_SECONDS`` (a lost batch the
        replay could not bring back, or a stalled daemon).
        """
        pending = dict(targets)
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                while True:
                    answer = await self.stub.ListPods(kvcache_pb2.ListPodsRequest())
                    for pod in answer.pods:
                        target = pending.get(pod.pod_id)
                        seq = pod.last_seq if pod.HasField("last_seq") else -1
                        if target is not None and seq >= target:
                            del pending[pod.pod_id]
                    if not pending:
                        return
                    await asyncio.sleep(0.0002)
        except TimeoutError:
            raise DaemonError(
                f"daemon still behind after {CATCH_UP_SECONDS}s: {pending}\n{self.logs()}"
            ) from None

    def logs(self, tail: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-tail:]

    async def stop(self) -> None:
        """Close the channel, SIGTERM the daemon (SIGKILL after 10 s), remove its files."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        process = self._process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), _STOP_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        self._log.close()
        self._dir.cleanup()
