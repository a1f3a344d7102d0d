"""Benchmark: the running daemon -- query latency, event-to-visible lag, memory.

Run: ``.venv/bin/python -m loadtest.bench_service [--quick] [--rss-10m] [--no-pin]``; the
report also goes to ``loadtest/results/service.md`` and ``service.json``.
The benchmark lives in ``loadtest.service_bench`` (its docstring says what it measures).
"""

from __future__ import annotations

from loadtest.service_bench.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
