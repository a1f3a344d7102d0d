"""The index benchmark runs on the native index and the native plane, and checks both answer
the prompt's holders right before timing them."""

from __future__ import annotations

import re

import pytest

from loadtest.bench_index import main


def test_reports_p50_and_p99_of_every_lookup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--entries", "5000", "--pods", "4", "--runs", "50"]) == 0
    out = capsys.readouterr().out
    timed = re.findall(r"^  (.+): p50=([\d.]+) us p99=([\d.]+) us$", out, re.MULTILINE)
    assert [name.split(",")[0] for name, _, _ in timed] == [
        "512-key chain",
        "512-key chain",
        "lookup by 8192 token ids (tokens mode)",
        "lookup by 512 block hashes (vllm mode)",
    ]
    for _, p50, p99 in timed:
        assert 0 < float(p50) <= float(p99)
    assert re.search(r"NativeIndex: 5,0\d\d entries, \d+ B/entry", out), out
