"""Processes: free ports, CPU and memory of a process tree from /proc, and a subprocess that
is always stopped (its whole process group) however the benchmark ends."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

import httpx

__all__ = [
    "Service",
    "cpu_seconds",
    "free_ports",
    "machine_busy_seconds",
    "own_tree_cpu_seconds",
    "rss_bytes",
    "stop_on_signals",
    "tree",
    "wait_http",
    "wait_quiet",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _stat_fields(pid: int) -> list[str]:
    # The command name may hold spaces and parentheses: split after its closing ")".
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds so far, summed over ``pids`` (all their threads)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def own_tree_cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children and its live descendants: all the
    benchmark started. The machine's busy time less this is other load."""
    fields = _stat_fields(os.getpid())
    mine = sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS  # utime stime cutime cstime
    return mine + cpu_seconds([pid for pid in tree(os.getpid()) if pid != os.getpid()])


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy so far (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def wait_quiet(limit: float, *, cores: float = 0.25, window: float = 3.0) -> float:
    """Wait until the machine is busy below ``cores`` over a ``window`` (other sessions'
    builds and tests skew every figure), at most ``limit`` seconds; the busy cores last seen."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds() - own_tree_cpu_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - own_tree_cpu_seconds() - before) / window
        if busy < cores or time.monotonic() >= deadline:
            return busy


def rss_bytes(pids: Sequence[int]) -> int:
    """VmRSS summed over ``pids``."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            total += int(found[1]) * 1024 if found else 0
    return total


class Service:
    """A long-running subprocess in its own process group (so the terminal's Ctrl-C reaches
    only the benchmark, which then stops it in order), its output in ``log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        return tree(self.pid) if self.alive() else []

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``timeout``; the exit code."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait)
        # Children that outlived the leader (still in its group) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.process.returncode


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit, so every ``finally`` stops what it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_http(service: Service, url: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the service's log if it exits first or
    ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{service.name} not ready after {timeout:.0f} s:\n{service.log_tail()}")
