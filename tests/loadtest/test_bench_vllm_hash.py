"""The native-vs-Python block hash benchmark runs, and checks both agree before timing."""

from __future__ import annotations

import pytest

from loadtest.bench_vllm_hash import main


def test_reports_every_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tokens", "512", "--runs", "5", "--python-runs", "2"]) == 0
    out = capsys.readouterr().out
    for workload in ("query, sha256 ", "query, sha256_cbor", "check, 16 blocks"):
        assert workload in out
