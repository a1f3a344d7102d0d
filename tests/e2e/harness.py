"""Drive the real daemon: a subprocess on loopback, fed by stand-in vLLM engines over ZeroMQ.

``Daemon`` starts ``python -m service serve`` with a YAML config on free ports and waits for
``/readyz``. ``Engine`` publishes vLLM-shaped batches like a vLLM engine does: an XPUB
socket (so it knows when the service has subscribed, instead of sleeping), 8-byte big-endian
sequence numbers, and an optional replay ROUTER answering from its buffer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
import zmq

from tests.support.vllm_wire import RawEvent, Version, WireEvent, encode_batch

ROOT = Path(__file__).resolve().parents[2]
END_SEQ = b"\xff" * 8
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], T | None], *, timeout: float = 10.0, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.02)


class Daemon:
    """A running ``kv-cache serve`` subprocess."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        config = {
            "api": {"host": "127.0.0.1", "port": self.http_port},
            "grpc": {"host": "127.0.0.1", "port": self.grpc_port},
            "logging": {"level": "info", "format": "json"},
            **config,
        }
        self._dir = tempfile.TemporaryDirectory()
        path = Path(self._dir.name) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self._log = open(Path(self._dir.name) / "stderr.log", "w+b")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_CACHE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--config", str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=5.0)
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        try:
            wait_for(self._ready, timeout=30.0, what="the daemon's /readyz")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.logs()}")
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def logs(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def locality(self, model: str, token_ids: Sequence[int], **extra: Any) -> dict[str, Any]:
        response = self.http.post(
            "/v1/locality", json={"model": model, "token_ids": list(token_ids), **extra}
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def matches(self, model: str, token_ids: Sequence[int], **extra: Any) -> dict[str, int]:
        """pod label -> match_length, for pods with a match."""
        pods = self.locality(model, token_ids, **extra)["pods"]
        return {
            p["pod_id"] + (f"@dp{p['dp_rank']}" if p["dp_rank"] else ""): p["match_length"]
            for p in pods
            if p["match_length"]
        }

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in ``/metrics`` (0 when absent)."""
        text = self.http.get("/metrics").text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, label_text = sample.partition("{")
            if metric != name:
                continue
            got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if got == wanted:
                return float(value)
        return 0.0

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        code = self.process.returncode
        self._log.close()
        self._dir.cleanup()
        return code


@contextlib.contextmanager
def daemon(config: dict[str, Any]) -> Iterator[Daemon]:
    running = Daemon(config)
    try:
        yield running
    finally:
        running.stop()


class Engine:
    """A stand-in vLLM engine: publishes batches with sequence numbers, answers replays."""

    def __init__(
        self,
        topic: str,
        *,
        connect: str | None = None,
        bind: str | None = None,
        replay_bind: str | None = None,
        version: Version = "0.33",
        replay_shape: str = "0.26",
    ) -> None:
        self.context = zmq.Context()
        self.topic = topic.encode()
        self.version: Version = version
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect is not None:
            self.pub.connect(connect)
        if bind is not None:
            self.pub.bind(bind)
        self._stop = threading.Event()
        self._replay_thread: threading.Thread | None = None
        self._replay_shape = replay_shape
        if replay_bind is not None:
            router = self.context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_bind)
            self._replay_thread = threading.Thread(target=self._serve_replays, args=(router,))
            self._replay_thread.start()

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Block until a subscriber's subscription arrives (XPUB sees it)."""
        if not self.pub.poll(int(timeout * 1000)):
            raise AssertionError("no subscriber connected to the engine")
        self.pub.recv()

    def publish(
        self,
        events: Sequence[WireEvent | RawEvent],
        *,
        dp_rank: int | None = 0,
        send: bool = True,
        seq: int | None = None,
    ) -> int:
        """Encode and publish one batch (``send=False``: only buffer it, as if lost)."""
        payload = encode_batch(events, version=self.version, dp_rank=dp_rank, ts=time.time())
        return self.publish_raw(payload, send=send, seq=seq)

    def publish_raw(self, payload: bytes, *, send: bool = True, seq: int | None = None) -> int:
        seq = self.seq if seq is None else seq
        self.seq = seq + 1
        self.buffer.append((seq, payload))
        if send:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_frames(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def _serve_replays(self, router: zmq.Socket[bytes]) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                identity, _, start = router.recv_multipart()
                first = int.from_bytes(start, "big")
                self.replay_requests.append(first)
                for seq, payload in list(self.buffer):
                    if seq >= first:
                        router.send_multipart(
                            self._reply(identity, seq.to_bytes(8, "big"), payload)
                        )
                router.send_multipart(self._reply(identity, END_SEQ, b""))
        finally:
            router.close(linger=0)

    def _reply(self, identity: bytes, seq: bytes, payload: bytes) -> list[bytes]:
        if self._replay_shape == "0.25":
            return [identity, b"", seq, payload]
        return [identity, b"", self.topic, seq, payload]

    def close(self) -> None:
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join(5)
        self.pub.close(linger=0)
        self.context.term()
