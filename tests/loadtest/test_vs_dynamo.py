"""loadtest.vs_dynamo's pure parts: the workload's chains and hashes, the reference and the
lost-block accounting, the answer parsers, the HTTP client's reader, and the report's
medians and verdicts. No Dynamo, no vLLM wheel, no network namespace."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadtest.vs_dynamo import cli, dynamo, ours
from loadtest.vs_dynamo.clients import percentile, read_response
from loadtest.vs_dynamo.measure import QUICK
from loadtest.vs_dynamo.report import markdown
from loadtest.vs_dynamo.verdicts import (
    TARGETS,
    Median,
    Target,
    derive,
    judge,
    median_figures,
)
from loadtest.vs_dynamo.workload import (
    BLOCK_SIZE,
    BLOCKS_PER_EVENT,
    CONTRACT_VECTORS,
    PODS,
    PROMPT_BLOCKS,
    QUERY,
    Chunk,
    Comparison,
    Prompt,
    Workload,
    chain_hashes,
    compare,
    contract_hasher,
    query_depth,
    stored_events,
)

# --- hashes and chains ----------------------------------------------------------------------


def test_contract_hasher_reproduces_the_vllm_vectors() -> None:
    for tokens, expected in CONTRACT_VECTORS:
        assert tuple(chain_hashes(tokens, contract_hasher())) == expected


def test_chain_hashes_cover_full_blocks_only_and_chain_on_the_parent() -> None:
    hasher = contract_hasher()
    tokens = list(range(1000, 1040))  # 2.5 blocks
    assert len(chain_hashes(tokens, hasher)) == 2
    # A different first block changes every later hash (the chain), not just its own.
    changed = [7, *tokens[1:]]
    pairs = zip(chain_hashes(tokens, hasher), chain_hashes(changed, hasher), strict=True)
    assert all(a != b for a, b in pairs)


def test_events_continue_their_prompt_chain() -> None:
    hasher = contract_hasher()
    prompt = Prompt("fill", 3, 5)
    chunks = [Chunk(prompt, first, BLOCKS_PER_EVENT) for first in range(0, 64, BLOCKS_PER_EVENT)]
    events = stored_events(chunks, seed=1, hasher=hasher)
    assert events[0].parent_block_hash is None
    for before, after in itertools.pairwise(events):
        assert after.parent_block_hash == before.block_hashes[-1]
    tokens = prompt.tokens(64, seed=1)
    assert [h for e in events for h in e.block_hashes] == chain_hashes(tokens, hasher)
    assert [t for e in events for t in e.token_ids] == tokens
    assert all(len(e.token_ids) == BLOCK_SIZE * len(e.block_hashes) for e in events)


def test_an_event_of_a_later_phase_continues_from_its_own_blocks() -> None:
    # A chunk starting mid-prompt, alone in its list, still links to the block before it.
    hasher = contract_hasher()
    prompt = Prompt("fill", 0, 0)
    (event,) = stored_events([Chunk(prompt, 32, 16)], seed=0, hasher=hasher)
    chain = chain_hashes(prompt.tokens(48, seed=0), hasher)
    assert event.parent_block_hash == chain[31]
    assert event.block_hashes == chain[32:48]


def test_prompt_tokens_are_prefix_stable_and_distinct() -> None:
    prompt = Prompt("fill", 1, 2)
    assert prompt.tokens(10, seed=4)[: 3 * BLOCK_SIZE] == prompt.tokens(3, seed=4)
    assert prompt.tokens(1, seed=4) != Prompt("fill", 2, 2).tokens(1, seed=4)
    assert prompt.tokens(1, seed=4) != prompt.tokens(1, seed=5)


# --- the plan --------------------------------------------------------------------------------


def test_workload_phases_have_the_blocks_asked_dealt_evenly() -> None:
    workload = Workload((100_000, 300_000))
    assert [workload.blocks(p) for p in (0, 1)] == [100_000, 300_000]
    for plan in workload.phases:
        events = [len(chunks) for chunks in plan]
        assert max(events) - min(events) <= 1


def test_phase_one_starts_with_the_query_prefix_of_each_pods_depth() -> None:
    workload = Workload((20_000, 20_000))
    for pod in range(PODS):
        query = [c for c in workload.phases[0][pod] if c.prompt == QUERY]
        assert sum(c.count for c in query) == query_depth(pod) == 512 - 64 * pod
        assert workload.phases[0][pod][: len(query)] == query
    assert not any(c.prompt == QUERY for plan in workload.phases[1:] for p in plan for c in p)


def test_each_phase_stores_new_prompts_and_names_each_pods_last_one() -> None:
    workload = Workload((20_000, 20_000))
    first = {c.prompt for chunks in workload.phases[0] for c in chunks}
    second = {c.prompt for chunks in workload.phases[1] for c in chunks}
    assert not first & second
    prompt, blocks = workload.last_prompt(1, 4)
    last = workload.phases[1][4][-1]
    assert (prompt, blocks) == (last.prompt, last.end)
    assert 0 < blocks <= PROMPT_BLOCKS


# --- the reference and the accounting ---------------------------------------------------


def test_reference_knows_each_pods_depth_of_the_query_and_each_fill_owner() -> None:
    workload = Workload((20_000, 20_000))
    reference = workload.reference()
    assert reference.expected(QUERY) == {pod: query_depth(pod) for pod in range(PODS)}
    assert reference.length(QUERY) == 512
    prompt, blocks = workload.last_prompt(0, 2)
    assert reference.expected(prompt) == {2: blocks}
    assert reference.blocks() == 40_000 + PODS  # the phases and one probe block per pod
    assert workload.reference(phases=1, probes=False).blocks() == 20_000


def test_reference_sample_is_deterministic_and_bounded() -> None:
    reference = Workload((20_000,)).reference()
    assert reference.sample(10, seed=3) == reference.sample(10, seed=3)
    assert len(reference.sample(10, seed=3)) == 10
    everything = reference.sample(0, seed=3)
    assert {p.kind for p in everything} == {"fill"}
    assert len(everything) == len({p for p in reference.held if p.kind == "fill"})


def test_compare_counts_missing_and_extra_blocks_per_pod() -> None:
    result = compare({0: 10, 3: 4}, {0: 7, 3: 4, 5: 2}, pods=8)
    assert result == Comparison(answers=8, mismatches=2, missing_blocks=3, extra_blocks=2)
    assert compare({1: 5}, {1: 5}, pods=8) == Comparison(answers=8)
    total = Comparison()
    total.add(result)
    total.add(compare({}, {2: 1}, pods=8))
    assert (total.answers, total.mismatches, total.extra_blocks) == (16, 3, 3)


# --- the indexers' answers -----------------------------------------------------------------


def test_dynamo_answer_counts_tokens_and_numbers_workers_from_one() -> None:
    answer = {
        "scores": {"1": {"0": 32}},
        "frequencies": [],
        "instances": {
            "1": {"longest_matched": 8192, "gpu": 8192, "dp": {"0": 8192}, "cpu": 0, "disk": 0},
            "8": {"longest_matched": 1024, "gpu": 1024, "dp": {"0": 1024}, "cpu": 0, "disk": 0},
        },
    }
    assert dynamo.matches(answer) == {0: 512, 7: 64}
    assert dynamo.matches({"scores": {}, "frequencies": [], "instances": {}}) == {}
    assert dynamo.query_body([1, 2]) == {"token_ids": [1, 2], "model_name": "bench-model"}


def test_our_answer_is_read_by_pod_id() -> None:
    answer = {
        "model": "bench-model",
        "pods": [
            {"pod_id": "pod-0", "dp_rank": 0, "match_length": 512},
            {"pod_id": "pod-7", "dp_rank": 0, "match_length": 64},
        ],
    }
    assert ours.matches(answer) == {0: 512, 7: 64}
    grpc_answer = SimpleNamespace(
        pods=[
            SimpleNamespace(pod_id="pod-3", dp_rank=0, match_length=320),
            SimpleNamespace(pod_id="pod-3", dp_rank=1, match_length=5),  # not a pod of ours
        ]
    )
    assert ours.grpc_matches(grpc_answer) == {3: 320}
    assert ours.query_body([3]) == {"model": "bench-model", "token_ids": [3]}


# --- the HTTP client and percentiles -----------------------------------------------------


def test_read_response_reads_one_answer_by_content_length() -> None:
    stream = io.BytesIO(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nnop"
    )
    assert read_response(stream) == (200, b"{}")
    assert read_response(stream) == (404, b"nop")
    with pytest.raises(ConnectionError):
        read_response(stream)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\n\r\n{}",  # no length
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
    ],
)
def test_read_response_refuses_what_it_cannot_read(raw: bytes) -> None:
    with pytest.raises(ValueError):
        read_response(io.BytesIO(raw))


def test_read_response_notices_a_truncated_body() -> None:
    with pytest.raises(ConnectionError):
        read_response(io.BytesIO(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile(list(reversed(values)), 0) == 1.0


# --- the report ------------------------------------------------------------------------------


def test_median_over_runs_skips_missing_values_and_counts_them() -> None:
    medians = median_figures([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": None}, {"a": 2.0}])
    assert medians["a"] == Median(2.0, 3, 3, 1.0, 3.0)
    assert medians["b"] == Median(5.0, 1, 3, 5.0, 5.0)


def test_derive_divides_loaded_p99_by_idle_p99() -> None:
    derived = derive(
        {
            "lat.idle.c1.ours-rest.p99_ms": 2.0,
            "lat.loaded.c1.ours-rest.p99_ms": 5.0,
            "lat.loaded.c1.ours-grpc.p99_ms": 5.0,  # no idle figure: cannot say
        }
    )
    assert derived["lat.loaded_over_idle.ours-rest"] == 2.5
    assert derived["lat.loaded_over_idle.ours-grpc"] is None


def _target(label: str) -> Target:
    return next(t for t in TARGETS if t.label.startswith(label))


def test_ratio_targets_are_met_at_the_bound_and_missed_below() -> None:
    ingest = _target("Ingest 0")
    met = judge(ingest, median_figures([_ingest(150.0, 100.0)]))
    missed = judge(ingest, median_figures([_ingest(149.0, 100.0)]))
    assert (met.met, met.ratio, met.verdict) == (True, "1.50x", "met")
    assert (missed.met, missed.verdict) == (False, "**MISSED**")
    latency = _target("Query p99, 1 client: REST")
    figures = {"lat.idle.c1.ours-rest.p99_ms": 0.9, "lat.idle.c1.dynamo-http.p99_ms": 1.0}
    assert judge(latency, median_figures([figures])).met is False
    figures["lat.idle.c1.ours-rest.p99_ms"] = 0.8
    assert judge(latency, median_figures([figures])).met is True


def _ingest(ours_rate: float, dynamo_rate: float | None) -> dict[str, float | None]:
    return {
        "ingest.phase1.ours.blocks_per_s": ours_rate,
        "ingest.phase1.dynamo.blocks_per_s": dynamo_rate,
    }


def test_a_figure_missing_in_every_run_cannot_be_judged() -> None:
    row = judge(_target("Ingest 0"), median_figures([_ingest(150.0, None)]))
    assert (row.met, row.verdict, row.dynamo) == (None, "n/a", "n/a")


def test_no_lost_blocks_means_none_in_any_run_not_the_median() -> None:
    lost = _target("Blocks lost")
    runs = [{"check.ours.missing_blocks": v, "check.dynamo.missing_blocks": 0.0} for v in (0, 0, 7)]
    row = judge(lost, median_figures(runs))
    assert row.met is False
    assert "worst run 7" in row.ours
    clean = [{"check.ours.missing_blocks": 0.0, "check.dynamo.missing_blocks": 0.0}] * 3
    assert judge(lost, median_figures(clean)).met is True


def test_agreement_must_hold_in_every_run_for_both_apis() -> None:
    agree = _target("Query prompt")
    good = {"agree.ours-rest": 1.0, "agree.ours-grpc": 1.0, "agree.dynamo-http": 1.0}
    assert judge(agree, median_figures([good, good, good])).met is True
    bad = {**good, "agree.ours-grpc": 0.0}
    row = judge(agree, median_figures([good, good, bad]))
    assert (row.met, row.ours) == (False, "yes / not in every run")


def test_loaded_over_idle_is_judged_on_ours_alone() -> None:
    target = _target("p99 under 100k blocks/s ingest / idle p99, REST")
    figures = {"lat.loaded_over_idle.ours-rest": 1.4, "lat.loaded_over_idle.dynamo-http": 9.0}
    row = judge(target, median_figures([figures]))
    assert (row.met, row.ratio, row.ours, row.dynamo) == (True, "-", "1.40x", "9.00x")


def test_markdown_has_the_judged_rows_and_the_setup(tmp_path: Path) -> None:
    figures = {**_ingest(150.0, 100.0), "check.prompts": 3.0}
    medians = median_figures([figures])
    rows = [judge(t, medians) for t in TARGETS]
    meta = {
        "command": "python -m loadtest.vs_dynamo",
        "date": "today",
        "runs": 1,
        "cpus": 2,
        "machine": "m",
        "ours": "o",
        "dynamo": "d",
        "vllm": "v",
        "workload": "w",
        "how": ["measured so"],
    }
    text = markdown(meta, medians, rows)
    assert (
        "| Ingest 0 -> 100k blocks (blocks/s) | 150 | 100 | 1.50x | >= 1.5x Dynamo | met |" in text
    )
    assert "- measured so" in text
    assert text.count("\n| ") >= len(TARGETS)


def test_an_indexer_that_kept_up_with_the_publishers_shows_a_floor() -> None:
    figures = {
        **_ingest(150.0, 100.0),
        "ingest.phase1.ours.publish_bound": 0.0,
        "ingest.phase1.dynamo.publish_bound": 1.0,
    }
    row = judge(_target("Ingest 0"), median_figures([figures]))
    assert (row.ours, row.dynamo) == ("150", ">= 100")
    # Dynamo's true rate may be higher: 1.5x its floor does not show 1.5x its rate.
    assert (row.met, row.verdict) == (None, "n/a (publish-bound)")
    # Below the bar against a floor is below it against the real rate too.
    slow = judge(_target("Ingest 0"), median_figures([{**figures, **_ingest(120.0, 100.0)}]))
    assert slow.met is False
    # Our floor above the bar meets it; below, it cannot be told.
    ours_floor = {**figures, "ingest.phase1.ours.publish_bound": 1.0}
    ours_floor["ingest.phase1.dynamo.publish_bound"] = 0.0
    assert judge(_target("Ingest 0"), median_figures([ours_floor])).met is True
    ours_floor["ingest.phase1.ours.blocks_per_s"] = 120.0
    assert judge(_target("Ingest 0"), median_figures([ours_floor])).met is None


def test_an_information_row_is_shown_not_judged() -> None:
    figures = {
        "ingest.phase2.ours.cpu_us_per_block": 0.5,
        "ingest.phase2.dynamo.cpu_us_per_block": 2.0,
    }
    row = judge(_target("Ingest CPU"), median_figures([figures]))
    assert (row.met, row.verdict, row.ratio) == (None, "-", "0.25x")


def test_render_judges_a_saved_report_again(tmp_path: Path) -> None:
    meta = {
        "command": "python -m loadtest.vs_dynamo",
        "date": "today",
        "runs": 2,
        "cpus": 2,
        "machine": "m",
        "ours": "o",
        "dynamo": "d",
        "vllm": "v",
        "workload": "w",
        "how": ["old"],
    }
    runs = [
        {"figures": {**_ingest(rate, 100.0), "check.ours.missing_blocks": 0.0}, "details": {}}
        for rate in (140.0, 160.0, 180.0)
    ]
    saved = tmp_path / "vs_dynamo.json"
    saved.write_text(json.dumps({"meta": meta, "plan": dataclasses.asdict(QUICK), "runs": runs}))
    assert cli.main(["--render", str(saved)]) == 0  # nothing missed: 1.6x, lost 0
    text = (tmp_path / "vs_dynamo.md").read_text()
    assert "| Ingest 0 -> 100k blocks (blocks/s) | 160 | 100 | 1.60x |" in text
    assert "- old" not in text  # the setup is described by this code again
    document = json.loads(saved.read_text())
    assert document["medians"]["ingest.phase1.ours.blocks_per_s"]["value"] == 160.0


# --- vLLM's own code, where the benchmark's vLLM venv exists --------------------------------

_VLLM_SITES = sorted(Path.home().glob(".cache/kv-cache-bench/vllm-venv/lib/python3*/site-packages"))


@pytest.mark.skipif(
    not _VLLM_SITES or not (_VLLM_SITES[0] / "vllm" / "distributed" / "kv_events.py").exists(),
    reason="no vLLM wheel installed (python -m loadtest.vs_dynamo installs it)",
)
def test_vllms_own_hash_and_events_match_the_workload() -> None:
    # In a subprocess: the loader puts stand-in vllm packages into sys.modules.
    script = """
import sys
from pathlib import Path
from types import SimpleNamespace
import msgspec
from loadtest.vs_dynamo.vllm_loader import load
from loadtest.vs_dynamo.workload import Chunk, Prompt, chain_hashes, contract_hasher, stored_events
vllm = load(Path(sys.argv[1]))
tokens = Prompt("fill", 2, 9).tokens(40, seed=3)
assert chain_hashes(tokens, vllm.hasher, vllm.external) == chain_hashes(tokens, contract_hasher())
(event,) = stored_events([Chunk(Prompt("fill", 2, 9), 16, 16)], 3, vllm.hasher, vllm.external)
kv = vllm.kv_events
stored = kv.BlockStored(block_hashes=event.block_hashes, parent_block_hash=event.parent_block_hash,
    token_ids=event.token_ids, block_size=16, lora_id=None, medium="GPU", lora_name=None)
wire = msgspec.msgpack.encode(kv.KVEventBatch(ts=1.0, events=[stored]))
ts, (decoded,), rank = msgspec.msgpack.decode(wire)
assert decoded["type"] == "BlockStored"
assert decoded["parent_block_hash"] == event.parent_block_hash
assert "torch" not in sys.modules
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(_VLLM_SITES[0])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
