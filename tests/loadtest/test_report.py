"""The report says met or missed from the numbers, and draws its charts."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.sim.report import Setup, WorkloadInfo, check_targets, markdown, write_charts


def row(workload: str, router: str, hit_rate: float, evictions: int = 10) -> dict[str, object]:
    return {
        "workload": workload,
        "router": router,
        "requests": 100,
        "hit_rate": hit_rate,
        "ttft_p50_s": 0.05,
        "ttft_p90_s": 12.5,
        "imbalance": 1.25,
        "route_p50_us": 900.0,
        "route_p99_us": 2500.0,
        "evictions": evictions,
    }


ROWS = [
    row("chat", "round-robin", 0.40),
    row("chat", "approx+load", 0.70),
    row("chat", "precise+load", 0.79),
    row("chat", "oracle+load", 0.80),
    row("rag", "round-robin", 0.30),
    row("rag", "approx+load", 0.44),
    row("rag", "precise+load", 0.40),
    row("rag", "oracle+load", 0.45),
]
INFOS = [
    WorkloadInfo("chat", "chat", 100, 3000, 1000),
    WorkloadInfo("rag", "rag", 100, 3000, 1000),
]


def test_targets_are_judged_against_the_same_policy_oracle_and_round_robin() -> None:
    chat, rag = check_targets(INFOS, ROWS)
    assert chat == (
        "chat, precise+load: 98.8% of oracle+load (>= 98%: met);"
        " 1.98x round-robin (>= 1.5x: met); 79.0% vs approx+load 70.0% (ahead: met)"
    )
    assert rag == (
        "rag, precise+load: 88.9% of oracle+load (>= 98%: MISSED);"
        " 1.33x round-robin (>= 1.5x: MISSED); 40.0% vs approx+load 44.0% (ahead: MISSED)"
    )


def test_no_pressure_no_hit_rate_targets() -> None:
    relaxed = [WorkloadInfo("chat", "chat", 100, 500, 1000)]
    (verdict,) = check_targets(relaxed, ROWS)
    assert "oracle" not in verdict and "round-robin" not in verdict


def test_markdown_table_rows() -> None:
    setup = Setup("python -m loadtest.sim", 8, 2048, 16, "0.33", 5.0, 120.0, 0.3, 0.7, 1, "t")
    text = markdown(setup, INFOS, ROWS)
    assert "| chat | precise+load | 79.0% | 0.99x | 1.98x | 50 ms | 12.5 s | 1.25 |" in text
    assert "| chat | round-robin | 40.0% | - | 1.00x |" in text
    assert "3,000 / 1,000 = 3.0x" in text


def test_charts_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_charts(tmp_path / "routing", ROWS)
    assert [p.name for p in paths] == [
        "routing-hit-rate.png",
        "routing-ttft.png",
        "routing-balance.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
