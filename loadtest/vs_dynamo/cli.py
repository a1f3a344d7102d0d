"""``python -m loadtest.vs_dynamo``: install what the comparison needs, enter a network
namespace, run, report.

Outside the namespace (the package index is reachable): make or reuse the Dynamo and vLLM
venvs, then replace this process with ``unshare -n sh -c 'ip link set lo up && exec python -m
loadtest.vs_dynamo --inner ARGS'``. Inside (only ``lo``, so Dynamo's 0.0.0.0 and vLLM's
``tcp://*`` binds reach nothing else): the runs, then the report to
``loadtest/results/vs_dynamo.{md,json}`` (``vs_dynamo-quick.*`` with ``--quick``), and the
target table on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.vs_dynamo import install, report, verdicts
from loadtest.vs_dynamo.measure import (
    FULL,
    QUICK,
    Plan,
    RunResult,
    Tools,
    run_once,
    steps_per_run,
)
from loadtest.vs_dynamo.procs import stop_on_signals, wait_quiet
from loadtest.vs_dynamo.workload import BLOCK_SIZE, BLOCKS_PER_EVENT, CHURN_PROMPTS, MODEL, PODS

__all__ = ["main"]

log = logging.getLogger("loadtest.vs_dynamo")
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "loadtest" / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.vs_dynamo",
        description="Our daemon and NVIDIA Dynamo's standalone KV indexer, side by side, fed"
        " by the same 8 vLLM 0.33 publishers.",
    )
    parser.add_argument("--runs", type=int, help="runs; each figure is the median (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, 1 run: a smoke test of a few minutes"
    )
    parser.add_argument(
        "--check-prompts",
        type=int,
        help="stored prompts checked against the reference per indexer (0: all; default 300)",
    )
    parser.add_argument(
        "--no-replay", action="store_true", help="give the indexers no replay endpoints"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other load on the machine to stop",
    )
    parser.add_argument(
        "--events-per-batch",
        type=int,
        help="BlockStored events per published batch in the phases (default 1)",
    )
    parser.add_argument("--dynamo-threads", type=int, help="Dynamo's --threads (default: its 4)")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "kv-cache-bench", help="venvs"
    )
    parser.add_argument(
        "--ours-root",
        type=Path,
        default=ROOT,
        help="the checkout whose daemon is measured (default: this one)",
    )
    parser.add_argument(
        "--ours-label", help="how the report names that checkout (default: its git revision)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the report")
    parser.add_argument("--no-save", action="store_true", help="print the report only")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy both indexers' logs of every run to this directory"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="no run: judge and write again the report saved in JSON (e.g. after a report change)",
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"replay": not args.no_replay}
    if args.check_prompts is not None:
        changes["check_prompts"] = args.check_prompts
    if args.dynamo_threads is not None:
        changes["dynamo_threads"] = args.dynamo_threads
    if args.events_per_batch is not None:
        changes["events_per_batch"] = max(1, args.events_per_batch)
    return dataclasses.replace(plan, **changes)


def _enter_namespace(argv: Sequence[str]) -> None:
    """Replace this process with the benchmark inside a new network namespace."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        raise SystemExit("needs unshare (util-linux) and ip (iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise SystemExit(f"cannot create a network namespace ({probe.stderr.strip()}): run as root")
    inner = [sys.executable, "-m", "loadtest.vs_dynamo", "--inner", *argv]
    script = 'ip link set lo up && exec "$@"'
    os.chdir(ROOT)
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", script, "sh", *inner])


class _Progress:
    """The tqdm bar: one tick per step of every run."""

    def __init__(self, bar: Any, run: int, runs: int) -> None:
        self.bar, self.prefix = bar, f"run {run + 1}/{runs}"

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"{self.prefix}: {name}")
        yield
        self.bar.update(1)


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, {memory:.1f} GiB;"
        f" Linux {platform.release()}; CPython {platform.python_version()}; nothing pinned"
    )


def _meta(
    argv: Sequence[str],
    plan: Plan,
    installed: install.Installed,
    runs: int,
    build: str,
    root: Path,
    label: str | None,
) -> dict[str, Any]:
    rev = _git(root, "rev-parse", "--short", "HEAD") or "? (not a git checkout)"
    dirty = _git(root, "status", "--porcelain", "--", "service")
    where = "" if root == ROOT else f" in {root}"
    ours = label or f"git {rev}{' + uncommitted changes in service/' if dirty else ''}{where}"
    phases = " then ".join(f"{b:,}" for b in plan.phase_blocks)
    return {
        "command": shlex.join(["python", "-m", "loadtest.vs_dynamo", *argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": runs,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": _machine(),
        "ours": f"{ours} (`python -m service serve`, in-memory index; build info: {build})",
        "dynamo": f"ai-dynamo-runtime {installed.dynamo_version} (`python -m dynamo.indexer`,"
        f" --threads {plan.dynamo_threads or 'default (4)'}), its own venv",
        "vllm": f"{installed.vllm_version}: `ZmqEventPublisher`, `BlockStored` (map form) and"
        " `hash_block_tokens` (sha256, default seed) from the wheel, no torch",
        "workload": f"{PODS} pods, model `{MODEL}`, block size {BLOCK_SIZE},"
        f" {BLOCKS_PER_EVENT} blocks per `BlockStored`, {plan.events_per_batch} event(s) per"
        " batch; phases of"
        f" {phases} blocks at full speed; replay endpoints"
        f" {'given to both' if plan.replay else 'not given'}",
        "how": _how(plan),
    }


def _how(plan: Plan) -> list[str]:
    """How the figures were taken, for the report's last section."""
    return [
        "Each pod is a process (multiprocessing spawn) running vLLM's own publisher: PUB"
        ' bound on `tcp://*:PORT`, replay ROUTER on the next port, topic `""`;'
        " both indexers connect to all 8. Everything runs in a network namespace with only"
        " `lo` (`unshare -n`).",
        'Ours: connect mode (`zmq.pods`, `zmq.endpoint: ""`, `zmq.topic_filter: ""`),'
        " `index.max_size` above every block sent. Dynamo: pods via `POST /register`"
        " (`instance_id` = pod + 1, `replay_endpoint`, `block_size` 16).",
        "Before timing: events built (token ids, vLLM's chained hashes); both indexers"
        " shown each pod's probe block (so both are subscribed).",
        "Queries: Dynamo `POST /query {token_ids, model_name}`, ours `POST /v1/locality"
        " {model, token_ids}` over the same minimal keep-alive HTTP/1.1 client (answers"
        " decoded); gRPC via `service.client.KVCacheClient` (`token_ids_packed`).",
        f"1 client: up to {plan.c1_requests} requests or {plan.c1_seconds:g} s;"
        f" {plan.concurrency} clients: {plan.cn_seconds:g} s, each its own process;"
        f" under ingest: {plan.loaded_seconds:g} s while the pods store"
        f" {plan.loaded_rate:,.0f} blocks/s (each pod cycling {CHURN_PROMPTS} prompts,"
        " evicting the oldest before storing the next: a full cache).",
        "Ingest visibility is bounded: a block not visible"
        f" {plan.visible_timeout:g} s after the last publish counts as missing.",
        "Verdicts: each ratio is of the medians. A figure marked >= is a floor (that"
        " indexer kept up with the publishers), so a ratio against it can only decide one"
        " way: n/a (publish-bound) otherwise.",
        "Other load: the machine's busy CPU (/proc/stat) less this benchmark's own process"
        " tree, i.e. other sessions sharing the machine; it slows both indexers alike.",
    ]


def _inner(args: argparse.Namespace, argv: Sequence[str]) -> int:
    plan = _plan(args)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    installed = install.locate(args.cache)
    tools = Tools(installed.dynamo_python, installed.vllm_site, args.ours_root.resolve())
    results: list[RunResult] = []
    # Through importlib: tqdm ships no type stubs (types-tqdm is not a dev dependency).
    tqdm: Any = importlib.import_module("tqdm").tqdm
    redirect: Any = importlib.import_module("tqdm.contrib.logging").logging_redirect_tqdm
    with (
        stop_on_signals(),
        redirect(),
        tqdm(total=runs * steps_per_run(plan), unit="step", file=sys.stderr) as bar,
    ):
        for run in range(runs):
            if args.wait_quiet > 0:
                bar.set_description(f"run {run + 1}/{runs}: waiting for a quiet machine")
                busy = wait_quiet(args.wait_quiet)
                log.info("other load before run %d: %.2f cores", run + 1, busy)
            steps = _Progress(bar, run, runs)
            results.append(run_once(plan, tools, run, steps, keep_logs=args.keep_logs))
    build = str(results[0].details.get("ours_build_info", "?")) if results else "?"
    meta = _meta(argv, plan, installed, runs, build, tools.ours_root, args.ours_label)
    runs_out = [{"figures": r.figures, "details": r.details} for r in results]
    stem = "vs_dynamo-quick" if args.quick else "vs_dynamo"
    return _report(
        meta, dataclasses.asdict(plan), runs_out, None if args.no_save else args.out / stem
    )


def _report(
    meta: dict[str, Any], plan: dict[str, Any], runs: list[dict[str, Any]], stem: Path | None
) -> int:
    """Judge the runs, write ``stem``.md and .json (unless None), print the target table;
    the exit code: 1 when a target is missed."""
    figures = [verdicts.derive(run["figures"]) for run in runs]
    medians = verdicts.median_figures(figures)
    rows = [verdicts.judge(t, medians) for t in verdicts.TARGETS]
    text = report.markdown(meta, medians, rows)
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(text)
        document = {
            "meta": meta,
            "plan": plan,
            "targets": [dataclasses.asdict(r) for r in rows],
            "medians": {k: dataclasses.asdict(m) for k, m in medians.items()},
            "runs": [{**run, "figures": f} for run, f in zip(runs, figures, strict=True)],
        }
        stem.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str))
        log.info("wrote %s", stem.with_suffix(".md"))
    targets = text[text.index("## Against the targets") : text.index("## Ingest")]
    print(targets.strip())  # the CLI's one output: the judged table
    return 0 if all(r.met is not False for r in rows) else 1


def _render(path: Path) -> int:
    """Judge and write again the runs saved in ``path`` (a report's JSON) with this code."""
    document = json.loads(path.read_text())
    plan = Plan(**{**document["plan"], "phase_blocks": tuple(document["plan"]["phase_blocks"])})
    meta = {**document["meta"], "how": _how(plan)}
    return _report(meta, document["plan"], document["runs"], path.with_suffix(""))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per control-plane request
    if args.render is not None:
        return _render(args.render)
    if args.inner:
        try:
            return _inner(args, [a for a in arguments if a != "--inner"])
        except KeyboardInterrupt:
            log.warning("interrupted: every process the benchmark started has been stopped")
            return 130
    install.ensure(args.cache)
    _enter_namespace(arguments)
    return 0  # not reached: the process is replaced
