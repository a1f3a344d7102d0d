"""The gRPC floor benchmark runs end to end: a real server subprocess, real calls."""

from __future__ import annotations

import re

import pytest

from loadtest.bench_grpc_floor import run_mode


@pytest.mark.parametrize("mode", ["none", "loop"])
def test_reports_latency_and_the_share_achieved(mode: str) -> None:
    line = run_mode(mode, share=0.2, requests=50, handler_us=50.0, switch=0.005)
    found = re.search(r"p50 ([\d,]+) us, p90 ([\d,]+) us, p99 ([\d,]+) us", line)
    assert found, line
    p50, p90, p99 = (int(v.replace(",", "")) for v in found.groups())
    assert 0 < p50 <= p90 <= p99
    achieved = re.search(r"achieved (\d+)%", line)
    if mode == "none":
        assert achieved is None
    else:
        assert achieved is not None and 0 < int(achieved.group(1)) <= 100
