"""The ingest benchmark runs on both data planes and indexes every block it sends."""

from __future__ import annotations

import asyncio
import re

import pytest

from loadtest.bench_ingest import main


@pytest.mark.parametrize("plane", ["native", "python"])
def test_reports_the_rate_of_each_shape(plane: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(main(["--blocks", "1024", "--plane", plane, "--memory"])) == 0
    out = capsys.readouterr().out
    rates = re.findall(
        rf"^{plane} plane, tokens mode, vLLM 0.33 wire, (\d+) block\(s\)/event, .*"
        r" ([\d,]+) blocks/s \(([\d,]+) blocks in",
        out,
        re.MULTILINE,
    )
    # Prompts of 256 blocks: 1024 blocks of 32-block events, a quarter of that of 1-block ones.
    assert [(shape, int(blocks.replace(",", ""))) for shape, _, blocks in rates] == [
        ("32", 1024),
        ("1", 256),
    ]
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _ in rates)
    assert re.search(r"^memory: -?\d+ B per entry, .* \(1,024 entries\)$", out, re.MULTILINE), out
