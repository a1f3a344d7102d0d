"""One run of the comparison: start the pods and both indexers, ingest the two phases, check
the answers against the reference, time the queries idle and under paced ingest, stop all.

Every figure goes into a flat ``{name: number or None}`` map (``report`` takes medians over
runs of each name); what is not a figure goes into ``details``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loadtest.vs_dynamo.clients import RawHttp, Target, ask, run_cell
from loadtest.vs_dynamo.dynamo import DynamoIndexer
from loadtest.vs_dynamo.indexers import Indexer, PodEndpoint
from loadtest.vs_dynamo.ours import OurDaemon
from loadtest.vs_dynamo.procs import (
    cpu_seconds,
    free_ports,
    machine_busy_seconds,
    own_tree_cpu_seconds,
)
from loadtest.vs_dynamo.publishers import ChurnReport, PhaseReport, Publishers, PublisherSpec
from loadtest.vs_dynamo.visibility import Deadline, join, watch
from loadtest.vs_dynamo.workload import (
    CHURN_PROMPTS,
    PODS,
    PROMPT_BLOCKS,
    QUERY,
    QUERY_BLOCKS,
    Comparison,
    Prompt,
    Workload,
    churn_prompts,
    compare,
    probe_prompt,
    query_depth,
)

__all__ = [
    "APIS",
    "FULL",
    "QUICK",
    "Plan",
    "RunResult",
    "Steps",
    "Tools",
    "run_once",
    "steps_per_run",
]

Figures = dict[str, float | None]
APIS = ("dynamo-http", "ours-rest", "ours-grpc")


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of a run."""

    phase_blocks: tuple[int, ...] = (100_000, 300_000)  # 0 -> 100k, then -> 400k
    check_prompts: int = 300  # stored prompts checked per indexer (<= 0: all of them)
    c1_requests: int = 3000
    c1_seconds: float = 15.0
    concurrency: int = 8
    cn_seconds: float = 10.0
    loaded_rate: float = 100_000.0  # blocks/s stored, all pods together
    loaded_seconds: float = 10.0
    visible_timeout: float = 60.0
    replay: bool = True
    dynamo_threads: int | None = None
    events_per_batch: int = 1  # in the phases; a busy engine's step carries several


FULL = Plan()
QUICK = Plan(
    phase_blocks=(20_000, 40_000),
    check_prompts=60,
    c1_requests=400,
    c1_seconds=4.0,
    cn_seconds=3.0,
    loaded_seconds=3.0,
)


@dataclass(frozen=True)
class Tools:
    """Where the installed comparison pieces are."""

    dynamo_python: Path
    vllm_site: Path
    ours_root: Path  # the checkout whose daemon runs (``python -m service`` started there)


@dataclass
class RunResult:
    figures: Figures = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def steps_per_run(plan: Plan) -> int:
    """Progress steps of a run: start, subscribe, the phases, check, 3 cells per API."""
    return 3 + len(plan.phase_blocks) + 3 * len(APIS)


class Steps(Protocol):
    """Progress: ``with steps.step("ingest phase 1"):`` around each step of a run."""

    def step(self, name: str) -> AbstractContextManager[None]: ...


class _Run:
    """The state of one run; the steps are its methods."""

    def __init__(self, plan: Plan, tools: Tools, seed: int, workdir: Path) -> None:
        self.plan, self.tools, self.seed = plan, tools, seed
        self.workload = Workload(plan.phase_blocks)
        self.result = RunResult()
        ports = free_ports(2 * PODS + 3)
        self.pods = [
            PodEndpoint(
                pod,
                f"tcp://127.0.0.1:{ports[2 * pod]}",
                f"tcp://127.0.0.1:{ports[2 * pod + 1]}" if plan.replay else None,
            )
            for pod in range(PODS)
        ]
        self.http_ports = ports[2 * PODS :]
        self.workdir = workdir
        sent = sum(plan.phase_blocks) + PODS * CHURN_PROMPTS * PROMPT_BLOCKS
        self.max_size = max(1_000_000, 2 * sent)

    def start(self, stack: contextlib.ExitStack) -> None:
        """Pods first (they bind), then both indexers (they connect)."""
        specs = [
            PublisherSpec(
                pod=p.pod,
                port=int(p.endpoint.rsplit(":", 1)[1]),
                replay_port=int(p.replay_endpoint.rsplit(":", 1)[1]) if p.replay_endpoint else None,
                vllm_site=self.tools.vllm_site,
                phase_blocks=self.plan.phase_blocks,
                seed=self.seed,
                events_per_batch=self.plan.events_per_batch,
            )
            for p in self.pods
        ]
        self.publishers = Publishers(specs)
        stack.callback(self.publishers.close)
        build = self.publishers.replies(600.0)
        self.result.details["pods_build_s"] = max(build)
        self.ours = OurDaemon(
            http_port=self.http_ports[0],
            grpc_port=self.http_ports[1],
            pods=self.pods,
            max_size=self.max_size,
            workdir=self.workdir,
            root=self.tools.ours_root,
        )
        stack.callback(self.ours.stop)
        self.dynamo = DynamoIndexer(
            self.tools.dynamo_python,
            port=self.http_ports[2],
            pods=self.pods,
            workdir=self.workdir,
            threads=self.plan.dynamo_threads,
        )
        stack.callback(self.dynamo.stop)
        self.ours.wait_ready(120.0)
        self.dynamo.wait_ready(60.0)
        self.indexers: list[Indexer] = [self.ours, self.dynamo]
        self.result.details["ours_build_info"] = self.ours.build_info()
        self.result.details["ours_config"] = self.ours.config

    def warm_up(self) -> None:
        """Republish each pod's probe block until both indexers show all eight: both are
        then subscribed to every pod (a PUB socket drops what it sends before that)."""
        targets = {pod: (probe_prompt(pod).tokens(1, self.seed), 1) for pod in range(PODS)}
        deadline = Deadline(time.monotonic() + 60.0)
        self.publishers.send("probe", 60.0)
        threads, seen = watch(self.indexers, targets, deadline)
        join(threads, deadline)
        self.publishers.send("stop")
        self.publishers.replies(30.0)
        for ix in self.indexers:
            if len(seen[ix.name]) < PODS:
                missing = sorted(set(range(PODS)) - set(seen[ix.name]))
                raise RuntimeError(
                    f"{ix.name} never showed pods {missing}' probe blocks:\n{ix.service.log_tail()}"
                )
        for ix in self.indexers:
            self.result.figures[f"rss.{ix.name}.start_mb"] = ix.service.rss_bytes() / 2**20

    def phase(self, phase: int) -> None:
        """Publish the phase at full speed; each indexer's ingest rate is the phase's blocks
        over the time from the first publish to its last block visible in that indexer."""
        name = f"phase{phase + 1}"
        targets = {}
        for pod in range(PODS):
            prompt, blocks = self.workload.last_prompt(phase, pod)
            targets[pod] = (prompt.tokens(blocks, self.seed), blocks)
        cpu, window = self._cpu(), time.monotonic()
        deadline = Deadline(time.monotonic() + 600.0)
        threads, seen = watch(self.indexers, targets, deadline)
        self.publishers.send("phase", phase)
        reports: list[PhaseReport] = self.publishers.replies(600.0)
        first = min(r.first for r in reports)
        drained = max(r.drained for r in reports)
        deadline.at = drained + self.plan.visible_timeout
        join(threads, deadline)
        blocks = sum(r.blocks for r in reports)
        figures = self.result.figures
        figures[f"ingest.{name}.blocks"] = blocks
        figures[f"ingest.{name}.publish_s"] = drained - first
        used_now, window = self._cpu(), time.monotonic() - window
        for who in ("pods", "machine", "other"):
            figures[f"ingest.{name}.{who}_cpu_s"] = used_now[who] - cpu[who]
        figures[f"ingest.{name}.other_cores"] = (used_now["other"] - cpu["other"]) / window
        for ix in self.indexers:
            key = f"ingest.{name}.{ix.name}"
            visible = seen[ix.name]
            done = len(visible) == PODS
            seconds = max(visible.values()) - first if done else None
            used = used_now[ix.name] - cpu[ix.name]
            figures[f"{key}.visible"] = 1.0 if done else 0.0
            figures[f"{key}.seconds"] = seconds
            figures[f"{key}.blocks_per_s"] = blocks / seconds if seconds else None
            # How far behind the pods it was when they finished; next to nothing means the
            # publishers, not the indexer, set the pace (50 ms: a few polls and wake-ups).
            lag = None if seconds is None else seconds - (drained - first)
            figures[f"{key}.lag_s"] = lag
            bound = lag is not None and lag <= 0.05 + 0.2 * (drained - first)
            figures[f"{key}.publish_bound"] = 1.0 if bound else 0.0
            figures[f"{key}.cpu_s"] = used
            figures[f"{key}.cpu_us_per_block"] = used / blocks * 1e6
            figures[f"rss.{ix.name}.{name}_mb"] = ix.service.rss_bytes() / 2**20
            self.result.details.setdefault("pods_not_visible", {})[f"{ix.name}.{name}"] = sorted(
                set(range(PODS)) - set(visible)
            )
        last = len(self.plan.phase_blocks) - 1
        if phase == last and last > 0:
            for ix in self.indexers:
                before = figures.get(f"rss.{ix.name}.phase1_mb")
                after = figures.get(f"rss.{ix.name}.{name}_mb")
                if before is not None and after is not None:
                    figures[f"rss.{ix.name}.growth_mb"] = after - before

    def check(self) -> None:
        """Every pod's match length, from each indexer, for the query prompt and a sample of
        stored prompts, against what the pods stored; and the query prompt from each API."""
        reference = self.workload.reference()
        sample = [QUERY, *reference.sample(self.plan.check_prompts, self.seed)]
        prompts: list[tuple[Prompt, list[int]]] = [
            (p, p.tokens(reference.length(p), self.seed)) for p in sample
        ]
        for ix in self.indexers:
            total = Comparison()
            client = RawHttp(ix.query.port, timeout=30.0)
            try:
                for prompt, tokens in prompts:
                    answer = client.send(RawHttp.request(ix.query.path, ix.query.body(tokens)))
                    got = ix.query.matches(answer)
                    total.add(compare(reference.expected(prompt), got, PODS))
            finally:
                client.close()
            for k, v in asdict(total).items():
                self.result.figures[f"check.{ix.name}.{k}"] = v
        self.result.figures["check.prompts"] = len(prompts)
        self.result.figures["check.blocks"] = sum(
            sum(reference.expected(p).values()) for p, _ in prompts
        )
        want = {pod: query_depth(pod) for pod in range(PODS)}
        for target in self.targets():
            got = ask(target)
            self.result.details.setdefault("query_matches", {})[target.label] = got
            self.result.figures[f"agree.{target.label}"] = 1.0 if got == want else 0.0
        self.result.details["ours_trouble_metrics"] = self.ours.trouble_metrics()
        for key, value in self.ours.pod_stats().items():
            self.result.figures[f"ours.pods.{key}"] = value
        self.result.details["dynamo_workers"] = [
            {k: w.get(k) for k in ("instance_id", "status")} for w in self.dynamo.workers()
        ]

    def targets(self) -> list[Target]:
        tokens = tuple(QUERY.tokens(QUERY_BLOCKS, self.seed))
        return [
            Target("dynamo-http", "http", tokens, query=self.dynamo.query),
            Target("ours-rest", "http", tokens, query=self.ours.query),
            Target("ours-grpc", "grpc", tokens, grpc_target=self.ours.grpc_target),
        ]

    def cell(
        self, state: str, target: Target, concurrency: int, requests: int, seconds: float
    ) -> None:
        """Run and record one latency cell, with the other load on the machine meanwhile."""
        other, began = self.other(), time.monotonic()
        cell = run_cell(target, concurrency=concurrency, requests=requests, seconds=seconds)
        key = f"lat.{state}.c{cell.concurrency}.{cell.label}"
        for k in ("p50_ms", "p99_ms", "qps", "requests", "errors"):
            self.result.figures[f"{key}.{k}"] = float(getattr(cell, k))
        other_cores = (self.other() - other) / (time.monotonic() - began)
        self.result.figures[f"{key}.other_cores"] = other_cores

    def idle_cell(self, target: Target, concurrency: int) -> None:
        plan = self.plan
        if concurrency == 1:
            self.cell("idle", target, 1, plan.c1_requests, plan.c1_seconds)
        else:
            self.cell("idle", target, concurrency, 10**9, plan.cn_seconds)  # by time only

    @contextlib.contextmanager
    def paced_ingest(self) -> Iterator[None]:
        """The pods store (and evict) ``loaded_rate`` blocks/s together meanwhile."""
        plan = self.plan
        budget = len(APIS) * (plan.loaded_seconds + 60.0) + 30.0
        cpu = self._cpu()
        began = time.monotonic()
        self.publishers.send("churn", plan.loaded_rate / PODS, budget)
        try:
            time.sleep(1.0)  # the pace settles; the indexers reach their steady state
            yield
        finally:
            self.publishers.send("stop")
            reports: list[ChurnReport] = self.publishers.replies(120.0)
            elapsed = time.monotonic() - began
            used = self._cpu()
            seconds = max(r.seconds for r in reports)
            figures = self.result.figures
            figures["loaded.stored_blocks_per_s"] = sum(r.stored for r in reports) / seconds
            figures["loaded.removed_blocks_per_s"] = sum(r.removed for r in reports) / seconds
            figures["loaded.fell_behind"] = sum(r.behind for r in reports)
            for who, total in used.items():
                figures[f"loaded.{who}.cores"] = (total - cpu[who]) / elapsed
            self._catch_up(reports)

    def _catch_up(self, reports: Sequence[ChurnReport]) -> None:
        """How long after the pods' last paced event each indexer showed it (0: at once):
        whether it kept up with the pace or built a backlog."""
        targets = {}
        for pod, report in enumerate(reports):
            prompt = churn_prompts(pod)[report.last_prompt]
            targets[pod] = (prompt.tokens(report.last_blocks, self.seed), report.last_blocks)
        drained = max(r.drained for r in reports)
        deadline = Deadline(drained + self.plan.visible_timeout)
        threads, seen = watch(self.indexers, targets, deadline)
        join(threads, deadline)
        for ix in self.indexers:
            visible = seen[ix.name]
            done = len(visible) == PODS
            self.result.figures[f"loaded.{ix.name}.caught_up"] = 1.0 if done else 0.0
            self.result.figures[f"loaded.{ix.name}.backlog_s"] = (
                max(0.0, max(visible.values()) - drained) if done else None
            )

    def _cpu(self) -> dict[str, float]:
        """CPU seconds so far: each indexer, the pods together, the whole machine."""
        cpu = {ix.name: ix.service.cpu_seconds() for ix in self.indexers}
        cpu["pods"] = cpu_seconds(self.publishers.pids())
        cpu["machine"] = machine_busy_seconds()
        cpu["other"] = self.other()
        return cpu

    @staticmethod
    def other() -> float:
        """Busy CPU seconds of the machine outside this benchmark's processes: other load,
        not ours to control, but it skews every figure, so it is reported."""
        return machine_busy_seconds() - own_tree_cpu_seconds()

    def loaded_cell(self, target: Target) -> None:
        self.cell("loaded", target, 1, 10**9, self.plan.loaded_seconds)

    def finish(self) -> None:
        for ix in (self.ours, self.dynamo):
            summary = ix.log_summary()
            self.result.details[f"{ix.name}_log"] = summary
            self.result.figures[f"{ix.name}.log_warnings"] = sum(summary.values())


def run_once(
    plan: Plan, tools: Tools, seed: int, steps: Steps, keep_logs: Path | None = None
) -> RunResult:
    """One full run; every process it starts is stopped when it returns or raises. With
    ``keep_logs``, both indexers' logs and our config are copied there (``run-<seed>-*``)."""
    with (
        tempfile.TemporaryDirectory(prefix="vs-dynamo-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        if keep_logs is not None:
            # Registered first, so it runs last: after the indexers have stopped.
            stack.callback(_copy_logs, Path(tmp), keep_logs, f"run-{seed}-")
        run = _Run(plan, tools, seed, Path(tmp))
        other, began = run.other(), time.monotonic()
        with steps.step("start pods and indexers"):
            run.start(stack)
        with steps.step("subscribe"):
            run.warm_up()
        for phase in range(len(plan.phase_blocks)):
            with steps.step(f"ingest phase {phase + 1}"):
                run.phase(phase)
        with steps.step("check answers"):
            run.check()
        targets = run.targets()
        for concurrency in (1, plan.concurrency):
            for target in targets:
                with steps.step(f"{target.label} c={concurrency}"):
                    run.idle_cell(target, concurrency)
        with run.paced_ingest():
            for target in targets:
                with steps.step(f"{target.label} c=1 under ingest"):
                    run.loaded_cell(target)
        run.finish()
        run.result.figures["run.other_cores"] = (run.other() - other) / (time.monotonic() - began)
        return run.result


def _copy_logs(workdir: Path, to: Path, prefix: str) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for path in workdir.iterdir():
        shutil.copyfile(path, to / f"{prefix}{path.name}")
