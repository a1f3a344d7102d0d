"""Progress on stderr (the report goes to stdout): phase lines, and tqdm bars over the
requests of a latency cell, the events of an index fill and the steps of the ingest ramp."""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Bar", "Progress"]


class Bar:
    """One tqdm bar (a silent one when progress is off); ``advance`` by a count, ``note``
    sets the text after the bar."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def advance(self, n: float = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)


class Progress:
    """Phase lines, tqdm bars and throttled in-place updates on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self._start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._enabled = enabled
        self._tqdm: Any = importlib.import_module("tqdm").tqdm if enabled else None
        self._last = 0.0
        self._open = False

    def _line(self, text: str) -> str:
        return f"[{time.monotonic() - self._start:6.1f}s] {text}"

    def step(self, text: str) -> None:
        if not self._enabled:
            return
        self._close()
        self._tqdm.write(self._line(text), file=sys.stderr)

    @contextlib.contextmanager
    def bar(self, total: float, desc: str, unit: str) -> Iterator[Bar]:
        """A bar on stderr for the ``with`` block (redrawn every 0.25 s on a terminal,
        every 10 s otherwise)."""
        if not self._enabled:
            yield Bar(None)
            return
        self._close()
        bar = self._tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.25 if self._tty else 10.0,
            smoothing=0.2,
            unit_scale=total >= 100_000,
        )
        try:
            yield Bar(bar)
        finally:
            bar.close()

    def update(self, text: str) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < (0.25 if self._tty else 5.0):
            return
        self._last = now
        line = "  " + self._line(text)
        if self._tty:
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
            self._open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False
