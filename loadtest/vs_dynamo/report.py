"""The Markdown report written to loadtest/results/vs_dynamo.md: the judged targets, then
the ingest, query and correctness figures and how they were taken."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.vs_dynamo.verdicts import Median, Row, format_median

__all__ = ["markdown"]

_OTHER_LOAD_WARNING = 0.1  # cores


def _other_load(median: Median | None) -> list[str]:
    """A warning line when other processes kept the machine busy during the runs."""
    if median is None or median.high is None or median.high < _OTHER_LOAD_WARNING:
        return []
    return [
        f"- **Other load**: processes outside this benchmark used {median.high:.2f} cores on"
        " average in the busiest run (they compete with both indexers alike, but every"
        " figure is lower than on a quiet machine)"
    ]


def _cores(medians: Mapping[str, Median], key: str) -> str:
    """Cores of other load; tick granularity makes a quiet machine read slightly below 0."""
    median = medians.get(key)
    if median is None or median.value is None:
        return "n/a"
    return f"{max(0.0, median.value):.2f}"


def _flag(medians: Mapping[str, Median], key: str) -> bool:
    median = medians.get(key)
    return median is not None and median.value == 1.0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(meta: Mapping[str, Any], medians: Mapping[str, Median], rows: Sequence[Row]) -> str:
    """The whole report."""
    m = medians

    def v(key: str, unit: str) -> str:
        return format_median(m.get(key), unit)

    lines = [
        "# kv-cache vs NVIDIA Dynamo's standalone KV indexer",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; {meta['runs']} run(s), each figure the median over runs"
        " (per-run values in `vs_dynamo.json`)",
        f"- Machine: {meta['machine']}",
        f"- Ours: {meta['ours']}",
        f"- Dynamo: {meta['dynamo']}",
        f"- vLLM: {meta['vllm']}",
        f"- Workload: {meta['workload']}",
        *_other_load(m.get("run.other_cores")),
        "",
        "## Against the targets",
        "",
        *_table(
            ("figure", "ours", "Dynamo", "ours/Dynamo", "target", "verdict"),
            [(r.label, r.ours, r.dynamo, r.ratio, r.target, r.verdict) for r in rows],
        ),
        "",
        "## Ingest",
        "",
        "Both indexers subscribe to the same 8 pods and ingest at once; a phase's rate is its"
        " blocks over the time from its first publish to its last block visible in that"
        " indexer's query answers (each pod's last prompt polled). CPU is the indexer's"
        " process tree over the phase (its own share of the 2 cores); RSS is after the phase.",
        "",
    ]
    rows_ingest = []
    for phase, title in ((1, "0 -> 100k"), (2, "100k -> 400k")):
        p = f"ingest.phase{phase}"
        for who in ("ours", "dynamo"):
            rows_ingest.append(
                (
                    f"{title}: {'ours' if who == 'ours' else 'Dynamo'}",
                    v(f"{p}.blocks", "blocks"),
                    v(f"{p}.publish_s", "s"),
                    v(f"{p}.{who}.seconds", "s"),
                    v(f"{p}.{who}.lag_s", "s"),
                    v(f"{p}.{who}.blocks_per_s", "blocks/s")
                    + (" (kept up)" if _flag(m, f"{p}.{who}.publish_bound") else ""),
                    v(f"{p}.{who}.cpu_s", "s"),
                    v(f"{p}.{who}.cpu_us_per_block", "us"),
                    v(f"rss.{who}.phase{phase}_mb", "MiB"),
                )
            )
    lines += _table(
        (
            "phase",
            "blocks",
            "published in (s)",
            "visible after (s)",
            "behind at the end (s)",
            "blocks/s",
            "CPU (s)",
            "CPU us/block",
            "RSS after (MiB)",
        ),
        rows_ingest,
    )
    lines += [
        "",
        "Behind at the end: from the pods' last send to the last block visible. (kept up):"
        " at most 50 ms + 20% of the publishing time behind, so its rate is the publishers'"
        " and its capacity is higher (>= in the table above; `--events-per-batch` raises the"
        " publishers' ceiling). Other load on the machine (processes not of this benchmark)"
        " meanwhile:"
        f" {_cores(m, 'ingest.phase1.other_cores')} and {_cores(m, 'ingest.phase2.other_cores')}"
        " cores.",
        "",
        f"RSS idle (after subscribing): ours {v('rss.ours.start_mb', 'MiB')} MiB, Dynamo"
        f" {v('rss.dynamo.start_mb', 'MiB')} MiB.",
        "",
        "## Queries",
        "",
        "A 512-block prompt (8192 token ids) held by pod i to depth 512 - 64 i. Client-side"
        " latency per request, each client a process with one keep-alive connection. Under"
        " ingest: the pods meanwhile store "
        f"{v('loaded.stored_blocks_per_s', 'blocks/s')} blocks/s (and evict"
        f" {v('loaded.removed_blocks_per_s', 'blocks/s')} blocks/s), paced. Other load:"
        " processes not of this benchmark, during the c=1, c=8 and under-ingest cells.",
        "",
    ]
    rows_lat = []
    for api, name in (
        ("dynamo-http", "Dynamo HTTP `/query`"),
        ("ours-rest", "ours REST `/v1/locality`"),
        ("ours-grpc", "ours gRPC `Locality`"),
    ):
        rows_lat.append(
            (
                name,
                v(f"lat.idle.c1.{api}.p50_ms", "ms"),
                v(f"lat.idle.c1.{api}.p99_ms", "ms"),
                v(f"lat.idle.c1.{api}.qps", "q/s"),
                v(f"lat.idle.c8.{api}.p50_ms", "ms"),
                v(f"lat.idle.c8.{api}.p99_ms", "ms"),
                v(f"lat.idle.c8.{api}.qps", "q/s"),
                v(f"lat.loaded.c1.{api}.p50_ms", "ms"),
                v(f"lat.loaded.c1.{api}.p99_ms", "ms"),
                " / ".join(
                    _cores(m, f"lat.{cell}.{api}.other_cores")
                    for cell in ("idle.c1", "idle.c8", "loaded.c1")
                ),
            )
        )
    lines += _table(
        (
            "API",
            "c=1 p50 (ms)",
            "c=1 p99 (ms)",
            "c=1 q/s",
            "c=8 p50 (ms)",
            "c=8 p99 (ms)",
            "c=8 q/s",
            "under ingest p50 (ms)",
            "under ingest p99 (ms)",
            "other load (cores)",
        ),
        rows_lat,
    )
    lines += [
        "",
        f"CPU while under ingest (cores): ours {v('loaded.ours.cores', 'cores')}, Dynamo"
        f" {v('loaded.dynamo.cores', 'cores')}, the 8 pods {v('loaded.pods.cores', 'cores')},"
        f" the whole machine {v('loaded.machine.cores', 'cores')} of {meta['cpus']}."
        " Backlog when the pace stopped (from the pods' last event to it visible):"
        f" ours {v('loaded.ours.backlog_s', 's')} s, Dynamo {v('loaded.dynamo.backlog_s', 's')} s.",
        "",
        "## Answers against the reference",
        "",
        f"After the last phase, the query prompt and stored prompts drawn at random"
        f" ({v('check.prompts', 'blocks')} prompts, {v('check.blocks', 'blocks')} (block, pod)"
        " entries): every pod's match length from each indexer against what the pods stored.",
        "",
        *_table(
            ("indexer", "answers", "mismatching", "blocks missing", "blocks extra"),
            [
                (
                    label,
                    v(f"check.{who}.answers", "blocks"),
                    v(f"check.{who}.mismatches", "blocks"),
                    v(f"check.{who}.missing_blocks", "blocks"),
                    v(f"check.{who}.extra_blocks", "blocks"),
                )
                for who, label in (("ours", "ours (REST)"), ("dynamo", "Dynamo (HTTP)"))
            ],
        ),
        "",
        f"Ours' own account (`/v1/pods`, all pods): {v('ours.pods.blocks', 'blocks')} blocks,"
        f" {v('ours.pods.gaps', 'blocks')} sequence gaps, {v('ours.pods.replays', 'blocks')}"
        f" replays, {v('ours.pods.lost_batches', 'blocks')} batches lost. Warnings and errors"
        f" logged over the run: ours {v('ours.log_warnings', 'blocks')}, Dynamo"
        f" {v('dynamo.log_warnings', 'blocks')} (by message in `vs_dynamo.json`).",
        "",
        "## How",
        "",
        *[f"- {line}" for line in meta["how"]],
        "",
    ]
    return "\n".join(lines)
