"""The daemon under test as a subprocess, CPU pinning, and readings from /proc."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.e2e.harness import ROOT, free_port

__all__ = ["Daemon", "Pinning", "cpu_seconds", "machine_busy_seconds"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy so far (``/proc/stat``: everything but idle, iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Pinning:
    """Who runs where: the daemon on the last CPU, this client and the publishers on the
    others; no pinning when disabled or with a single CPU."""

    cpus: tuple[int, ...]
    daemon: frozenset[int] | None
    client: frozenset[int] | None

    @classmethod
    def plan(cls, enabled: bool) -> Pinning:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        if not enabled or len(cpus) < 2:
            return cls(cpus, None, None)
        return cls(cpus, frozenset(cpus[-1:]), frozenset(cpus[:-1]))

    def describe(self) -> str:
        if self.daemon is None:
            return "no pinning"
        return (
            f"daemon (all threads) pinned to CPU {self.cpus[-1]}, this client and the"
            f" publishers to CPU {','.join(map(str, self.cpus[:-1]))}"
        )


class Daemon:
    """``python -m service serve`` on loopback, optionally pinned to ``cpus``."""

    def __init__(self, *, max_size: int, cpus: Set[int] | None) -> None:
        self.http_port, self.grpc_port, zmq_port = free_port(), free_port(), free_port()
        self.zmq_endpoint = f"tcp://127.0.0.1:{zmq_port}"
        config = {
            "api": {"host": "127.0.0.1", "port": self.http_port},
            "grpc": {"host": "127.0.0.1", "port": self.grpc_port},
            "zmq": {"endpoint": self.zmq_endpoint},
            "index": {"max_size": max_size},
            "logging": {"level": "info", "format": "json"},
        }
        self._dir = tempfile.TemporaryDirectory(prefix="kv-cache-bench-")
        path = Path(self._dir.name) / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self._log = open(Path(self._dir.name) / "stderr.log", "w+b")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_CACHE_")}
        mine = os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, cpus)  # inherited by the daemon and all its threads
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--config", str(path)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
            )
        finally:
            os.sched_setaffinity(0, mine)
        self.pid = self.process.pid
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"daemon exited {self.process.returncode}:\n{self.logs()[-4000:]}"
                    )
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def rss_bytes(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
        return int(found["VmRSS"]) * 1024, int(found["VmHWM"]) * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far (all its threads)."""
        return cpu_seconds(self.pid)

    def logs(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def log_summary(self) -> dict[str, int]:
        """Log lines by level, and warnings and errors by message ("warning: sequence gap")."""
        counts: dict[str, int] = {}
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
                level = str(record.get("level", "?"))
            except (ValueError, AttributeError):
                record, level = {}, "unparsed"
            counts[level] = counts.get(level, 0) + 1
            if level in ("warning", "error", "critical"):
                key = f"{level}: {record.get('event', '?')}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def close(self) -> None:
        self._log.close()
        self._dir.cleanup()
