"""Figures over runs and the verdicts: medians, ours/Dynamo ratios, and each target met or
missed.

Each figure is the median of its per-run values (runs where it is missing, e.g. blocks never
visible, are left out and counted); a ratio is ours' median over Dynamo's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "TARGETS",
    "Median",
    "Row",
    "Target",
    "derive",
    "format_median",
    "judge",
    "median_figures",
]

Figures = Mapping[str, float | None]
_RATIO_RULES = ("ratio>=", "ratio<=", "info")


def derive(figures: Figures) -> dict[str, float | None]:
    """Per-run figures plus those computed from them: each API's p99 under paced ingest over
    its idle p99 (``lat.loaded_over_idle.<api>``)."""
    out = dict(figures)
    for key, value in figures.items():
        if key.startswith("lat.loaded.c1.") and key.endswith(".p99_ms"):
            api = key.removeprefix("lat.loaded.c1.").removesuffix(".p99_ms")
            idle = figures.get(f"lat.idle.c1.{api}.p99_ms")
            ok = value is not None and idle is not None and idle > 0
            out[f"lat.loaded_over_idle.{api}"] = value / idle if ok else None  # type: ignore[operator]
    return out


@dataclass(frozen=True)
class Median:
    """A figure over runs: the median of the runs that have it, and how many did."""

    value: float | None
    runs: int
    of: int
    low: float | None  # the smallest and largest run (a count that must be 0 in every run,
    high: float | None  # an agreement that must hold in every run)


def _median(values: Sequence[float | None]) -> Median:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return Median(
        statistics.median(present) if present else None,
        len(present),
        len(values),
        min(present) if present else None,
        max(present) if present else None,
    )


def median_figures(runs: Sequence[Figures]) -> dict[str, Median]:
    """Every figure's median over ``runs`` (a figure absent from a run counts as missing)."""
    names = sorted({name for run in runs for name in run})
    return {name: _median([run.get(name) for run in runs]) for name in names}


@dataclass(frozen=True)
class Target:
    """A headline row: ours and Dynamo's figures (either may be None), and the rule.

    ``rule`` is ``ratio>=``/``ratio<=`` (ours/Dynamo against ``bound``), ``zero`` (ours'
    worst run must be 0), ``ours<=`` / ``all-1`` (ours' own value(s) against ``bound``) or
    ``info`` (shown, not judged)."""

    label: str
    ours: str | tuple[str, ...]
    dynamo: str | None
    rule: str
    bound: float
    unit: str
    text: str
    lower_bound: tuple[str, str] | None = None  # flags: ours', Dynamo's value is only a floor


TARGETS: tuple[Target, ...] = (
    Target(
        "Ingest 0 -> 100k blocks",
        "ingest.phase1.ours.blocks_per_s",
        "ingest.phase1.dynamo.blocks_per_s",
        "ratio>=",
        1.5,
        "blocks/s",
        ">= 1.5x Dynamo",
        ("ingest.phase1.ours.publish_bound", "ingest.phase1.dynamo.publish_bound"),
    ),
    Target(
        "Ingest 100k -> 400k blocks",
        "ingest.phase2.ours.blocks_per_s",
        "ingest.phase2.dynamo.blocks_per_s",
        "ratio>=",
        1.5,
        "blocks/s",
        ">= 1.5x Dynamo",
        ("ingest.phase2.ours.publish_bound", "ingest.phase2.dynamo.publish_bound"),
    ),
    Target(
        "Ingest CPU per block, 100k -> 400k",
        "ingest.phase2.ours.cpu_us_per_block",
        "ingest.phase2.dynamo.cpu_us_per_block",
        "info",
        0,
        "us",
        "(none: what the rates cost)",
    ),
    Target(
        "Blocks lost, sampled prompts x 8 pods",
        "check.ours.missing_blocks",
        "check.dynamo.missing_blocks",
        "zero",
        0,
        "blocks",
        "0 in every run",
    ),
    Target(
        "Query p99, 1 client: REST vs Dynamo HTTP",
        "lat.idle.c1.ours-rest.p99_ms",
        "lat.idle.c1.dynamo-http.p99_ms",
        "ratio<=",
        0.8,
        "ms",
        "<= 0.8x Dynamo",
    ),
    Target(
        "Query p99, 1 client: gRPC vs Dynamo HTTP",
        "lat.idle.c1.ours-grpc.p99_ms",
        "lat.idle.c1.dynamo-http.p99_ms",
        "ratio<=",
        1.0,
        "ms",
        "<= 1.0x Dynamo",
    ),
    Target(
        "Queries/s, 8 clients: REST vs Dynamo HTTP",
        "lat.idle.c8.ours-rest.qps",
        "lat.idle.c8.dynamo-http.qps",
        "ratio>=",
        1.2,
        "q/s",
        ">= 1.2x Dynamo",
    ),
    Target(
        "Queries/s, 8 clients: gRPC vs Dynamo HTTP",
        "lat.idle.c8.ours-grpc.qps",
        "lat.idle.c8.dynamo-http.qps",
        "ratio>=",
        1.2,
        "q/s",
        ">= 1.2x Dynamo",
    ),
    Target(
        "RSS at 400k blocks",
        "rss.ours.phase2_mb",
        "rss.dynamo.phase2_mb",
        "ratio<=",
        1.0,
        "MiB",
        "<= 1.0x Dynamo",
    ),
    Target(
        "RSS growth 100k -> 400k blocks",
        "rss.ours.growth_mb",
        "rss.dynamo.growth_mb",
        "ratio<=",
        0.5,
        "MiB",
        "<= 0.5x Dynamo's",
    ),
    Target(
        "p99 under 100k blocks/s ingest / idle p99, REST",
        "lat.loaded_over_idle.ours-rest",
        "lat.loaded_over_idle.dynamo-http",
        "ours<=",
        1.5,
        "x",
        "<= 1.5 (ours)",
    ),
    Target(
        "p99 under 100k blocks/s ingest / idle p99, gRPC",
        "lat.loaded_over_idle.ours-grpc",
        "lat.loaded_over_idle.dynamo-http",
        "ours<=",
        1.5,
        "x",
        "<= 1.5 (ours)",
    ),
    Target(
        "Query prompt: per-pod match = reference (REST, gRPC)",
        ("agree.ours-rest", "agree.ours-grpc"),
        "agree.dynamo-http",
        "all-1",
        1.0,
        "agree",
        "yes, every run",
    ),
)


@dataclass(frozen=True)
class Row:
    """A judged headline row, as rendered."""

    label: str
    ours: str
    dynamo: str
    ratio: str
    target: str
    verdict: str
    met: bool | None  # None: cannot be judged (a figure is missing)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("blocks/s", "q/s", "blocks"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "MiB":
        return f"{value:,.1f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit in ("s", "us", "cores"):
        return f"{value:.2f}"
    return f"{value:g}"


def format_median(median: Median | None, unit: str) -> str:
    if median is None or median.value is None:
        return "n/a"
    text = _fmt(median.value, unit)
    if median.runs < median.of:
        text += f" ({median.runs}/{median.of} runs)"
    return text


def judge(target: Target, medians: Mapping[str, Median]) -> Row:
    """The row of ``target``: medians, ratio, and met / MISSED / n/a."""
    ours_keys = (target.ours,) if isinstance(target.ours, str) else target.ours
    ours = [medians.get(key) for key in ours_keys]
    dynamo = medians.get(target.dynamo) if target.dynamo else None
    ours_value = ours[0].value if ours[0] is not None else None
    dyn_value = dynamo.value if dynamo is not None else None
    ratio = None
    if ours_value is not None and dyn_value not in (None, 0):
        ratio = ours_value / dyn_value
    checks: dict[str, Callable[[], bool | None]] = {
        "ratio>=": lambda: None if ratio is None else ratio >= target.bound,
        "ratio<=": lambda: None if ratio is None else ratio <= target.bound,
        "ours<=": lambda: None if ours_value is None else ours_value <= target.bound,
        "zero": lambda: _all_runs(ours, lambda m: m.high == 0),
        "all-1": lambda: _all_runs(ours, lambda m: m.low == 1.0),
        "info": lambda: None,
    }
    met = checks[target.rule]()
    ours_floor = dyn_floor = False
    if target.lower_bound is not None:
        # In the median run the indexer kept up with the publishers: its figure is a floor.
        ours_floor, dyn_floor = (_is_one(medians.get(flag)) for flag in target.lower_bound)
        met = _with_floors(met, ours_floor, dyn_floor)
    verdict = {True: "met", False: "**MISSED**", None: "n/a"}[met]
    if met is None and (ours_floor or dyn_floor):
        verdict = "n/a (publish-bound)"
    if target.rule == "info":
        verdict = "-"
    if target.rule == "zero" and ours[0] is not None and ours[0].high:
        ours_text = f"{format_median(ours[0], target.unit)} (worst run {ours[0].high:,.0f})"
    elif target.rule == "all-1":
        ours_text = " / ".join(_agree(m) for m in ours)
    else:
        ours_text = format_median(ours[0], target.unit)
    if target.rule == "all-1":
        dyn_text = _agree(dynamo)
    elif target.rule == "zero" and dynamo is not None and dynamo.high:
        dyn_text = f"{format_median(dynamo, target.unit)} (worst run {dynamo.high:,.0f})"
    else:
        dyn_text = format_median(dynamo, target.unit)
    ours_text = f">= {ours_text}" if ours_floor else ours_text
    dyn_text = f">= {dyn_text}" if dyn_floor else dyn_text
    unit = "" if target.unit in ("x", "agree") else f" {target.unit}"
    return Row(
        label=f"{target.label}{f' ({unit.strip()})' if unit else ''}",
        ours=ours_text,
        dynamo=dyn_text,
        ratio="-" if ratio is None or target.rule not in _RATIO_RULES else f"{ratio:.2f}x",
        target=target.text,
        verdict=verdict,
        met=met,
    )


def _is_one(median: Median | None) -> bool:
    return median is not None and median.value == 1.0


def _with_floors(met: bool | None, ours_floor: bool, dyn_floor: bool) -> bool | None:
    """A ``ratio>=`` verdict when a figure is only a floor: ours' floor above the bar still
    meets it, Dynamo's floor makes the ratio an upper bound (below the bar still misses);
    anything else cannot be told."""
    if met is None or (ours_floor and dyn_floor):
        return None
    if ours_floor:
        return True if met else None
    if dyn_floor:
        return False if not met else None
    return met


def _all_runs(medians: Sequence[Median | None], test: Callable[[Median], bool]) -> bool | None:
    if any(m is None or m.value is None for m in medians):
        return None
    return all(test(m) and m.runs == m.of for m in medians if m is not None)


def _agree(median: Median | None) -> str:
    if median is None or median.value is None:
        return "n/a"
    if median.low == 1.0 and median.runs == median.of:
        return "yes"  # in every run
    return "no" if median.high != 1.0 else "not in every run"
