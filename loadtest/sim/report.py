"""The simulator's outputs: a Markdown table, the targets checked, PNG charts, raw JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Setup", "WorkloadInfo", "check_targets", "markdown", "write_charts", "write_json"]

Row = Mapping[str, Any]

TARGET_OF_ORACLE = 0.98
TARGET_OVER_ROUND_ROBIN = 1.5
TARGET_WORKLOADS = ("chat", "rag")
# Families share a hue, the +load variant darker: baselines grey, approx orange, this
# service blue, the oracle green.
COLOURS = {
    "round-robin": "#b0b0b0",
    "random": "#d9d9d9",
    "approx": "#f6b26b",
    "approx+load": "#e06c00",
    "precise": "#6fa8dc",
    "precise+load": "#1c4587",
    "oracle": "#93c47d",
    "oracle+load": "#38761d",
}


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    name: str
    description: str
    requests: int
    distinct_blocks: int
    cluster_blocks: int

    @property
    def pressure(self) -> float:
        """Distinct blocks / blocks the whole cluster can hold."""
        return self.distinct_blocks / self.cluster_blocks


@dataclass(frozen=True, slots=True)
class Setup:
    """How the results were produced, printed above the table."""

    command: str
    engines: int
    capacity_blocks: int
    block_size: int
    wire: str
    event_lag_ms: float
    approx_ttl_s: float
    load_penalty: float
    load: float
    seed: int
    timing: str


def _oracle_of(router: str) -> str:
    return "oracle+load" if router.endswith("+load") else "oracle"


def _by_key(rows: Sequence[Row]) -> dict[tuple[str, str], Row]:
    return {(str(r["workload"]), str(r["router"])): r for r in rows}


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or reference <= 0:
        return "-"
    return f"{value / reference:.2f}x"


def markdown(setup: Setup, workloads: Sequence[WorkloadInfo], rows: Sequence[Row]) -> str:
    """The results table, one block of rows per workload, and the target verdicts."""
    by_key = _by_key(rows)
    lines = [
        f"Command: `{setup.command}`",
        "",
        f"{setup.engines} engines x {setup.capacity_blocks} blocks of {setup.block_size} tokens;"
        f" vLLM {setup.wire} events; event lag {setup.event_lag_ms:g} ms (simulated);"
        f" approx TTL {setup.approx_ttl_s:g} s; load penalty {setup.load_penalty:g};"
        f" offered load {setup.load:g}; seed {setup.seed}; {setup.timing}.",
        "",
        "| workload | requests | distinct blocks / cluster cache |",
        "|---|---|---|",
    ]
    for info in workloads:
        lines.append(
            f"| {info.name}: {info.description} | {info.requests} |"
            f" {info.distinct_blocks:,} / {info.cluster_blocks:,} = {info.pressure:.1f}x |"
        )
    lines += [
        "",
        "| workload | router | hit rate | of oracle | vs round-robin | TTFT p50 | TTFT p90 |"
        " imbalance | route p50 | route p99 | evictions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        workload, router = str(row["workload"]), str(row["router"])
        prefix_router = router.removesuffix("+load") in ("approx", "precise", "oracle")
        oracle = by_key.get((workload, _oracle_of(router))) if prefix_router else None
        rr = by_key.get((workload, "round-robin"))
        lines.append(
            f"| {workload} | {router} | {row['hit_rate']:.1%} |"
            f" {_ratio(row['hit_rate'], oracle['hit_rate'] if oracle else None)} |"
            f" {_ratio(row['hit_rate'], rr['hit_rate'] if rr else None)} |"
            f" {_seconds(row['ttft_p50_s'])} | {_seconds(row['ttft_p90_s'])} |"
            f" {row['imbalance']:.2f} | {_latency(row['route_p50_us'])} |"
            f" {_latency(row['route_p99_us'])} | {row['evictions']:,} |"
        )
    lines += ["", "Targets (cache pressure > 1x):", ""]
    lines += [f"- {verdict}" for verdict in check_targets(workloads, rows)]
    return "\n".join(lines) + "\n"


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds * 1000:.0f} ms"


def _latency(microseconds: float) -> str:
    if microseconds >= 1000:
        return f"{microseconds / 1000:.1f} ms"
    return f"{microseconds:.0f} us"


def check_targets(workloads: Sequence[WorkloadInfo], rows: Sequence[Row]) -> list[str]:
    """One line per target and precise variant: met or missed, with the numbers."""
    by_key = _by_key(rows)
    verdicts = []
    for info in workloads:
        for router in ("precise", "precise+load"):
            row = by_key.get((info.name, router))
            if row is None:
                continue
            hit = float(row["hit_rate"])
            checks = []
            oracle = by_key.get((info.name, _oracle_of(router)))
            rr = by_key.get((info.name, "round-robin"))
            approx = by_key.get((info.name, router.replace("precise", "approx")))
            if info.name in TARGET_WORKLOADS and info.pressure > 1:
                if oracle is not None and oracle["hit_rate"] > 0:
                    share = hit / float(oracle["hit_rate"])
                    met = "met" if share >= TARGET_OF_ORACLE else "MISSED"
                    checks.append(f"{share:.1%} of {oracle['router']} (>= 98%: {met})")
                if rr is not None and rr["hit_rate"] > 0:
                    gain = hit / float(rr["hit_rate"])
                    met = "met" if gain >= TARGET_OVER_ROUND_ROBIN else "MISSED"
                    checks.append(f"{gain:.2f}x round-robin (>= 1.5x: {met})")
            if approx is not None and int(row["evictions"]) > 0:
                other = float(approx["hit_rate"])
                met = "met" if hit > other else ("tied" if hit == other else "MISSED")
                checks.append(f"{hit:.1%} vs {approx['router']} {other:.1%} (ahead: {met})")
            if checks:
                verdicts.append(f"{info.name}, {router}: " + "; ".join(checks))
    return verdicts


def write_json(
    path: Path, setup: Setup, workloads: Sequence[WorkloadInfo], rows: Sequence[Row]
) -> None:
    document = {
        "setup": {name: getattr(setup, name) for name in Setup.__slots__},
        "workloads": [
            {name: getattr(info, name) for name in WorkloadInfo.__slots__} for info in workloads
        ],
        "results": list(rows),
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


def write_charts(prefix: Path, rows: Sequence[Row]) -> list[Path]:
    """Grouped bar charts (workloads x routers): hit rate, TTFT, balance. Their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(str(r["workload"]) for r in rows))
    routers = list(dict.fromkeys(str(r["router"]) for r in rows))
    by_key = _by_key(rows)
    width = 0.8 / len(routers)

    def bars(axis: Any, metric: str, scale: float = 1.0, label: bool = False) -> None:
        for i, router in enumerate(routers):
            xs = [w + (i - (len(routers) - 1) / 2) * width for w in range(len(workloads))]
            values = [
                float(by_key[(w, router)][metric]) * scale if (w, router) in by_key else 0.0
                for w in workloads
            ]
            colour = COLOURS.get(router, "#555555")
            drawn = axis.bar(xs, values, width, label=router, color=colour)
            if label:
                axis.bar_label(drawn, fmt="%.0f", fontsize=6, padding=1)
        axis.set_xticks(range(len(workloads)), workloads)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)

    paths = []

    figure, axis = plt.subplots(figsize=(11, 4.8))
    bars(axis, "hit_rate", 100.0, label=True)
    axis.set_ylabel("prefix-cache hit rate (% of prompt tokens)")
    axis.set_ylim(0, 100)
    axis.set_title("Prompt tokens served from cache, by workload and router (higher is better)")
    _legend_below(figure, axis, len(routers))
    paths.append(_save(figure, prefix, "hit-rate"))

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bars(axes[0], "ttft_p50_s", 1000.0)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("modeled TTFT p50 (ms, log)")
    axes[0].set_title("Time to first token, median (lower is better)")
    bars(axes[1], "ttft_p90_s", 1000.0)
    axes[1].set_ylabel("modeled TTFT p90 (ms, log)")
    axes[1].set_title("Time to first token, p90 (lower is better)")
    axes[1].set_yscale("log")
    _legend_below(figure, axes[0], len(routers))
    paths.append(_save(figure, prefix, "ttft"))

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bars(axes[0], "imbalance")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("max / mean requests per engine")
    axes[0].set_title("Load imbalance (1.0 = even)")
    bars(axes[1], "route_p50_us")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("routing decision p50 (us, log)")
    axes[1].set_title("Routing decision latency (wall clock)")
    _legend_below(figure, axes[0], len(routers))
    paths.append(_save(figure, prefix, "balance"))
    return paths


def _legend_below(figure: Any, axis: Any, entries: int) -> None:
    """One row of legend under the whole figure, from ``axis``'s bars."""
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, ncols=entries, fontsize=8, loc="lower center", frameon=False)


def _save(figure: Any, prefix: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = prefix.with_name(f"{prefix.name}-{name}.png")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
