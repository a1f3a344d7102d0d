"""The real daemon (on its default, the native data plane), fed over real ZeroMQ by stand-in
vLLM engines, answering over REST."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ROOT, Daemon, Engine, daemon, free_port, wait_for
from tests.support.vllm_wire import cleared, pack, raw, removed, stored

MODEL = "qwen/qwen3"
PROMPT = list(range(5000, 5064))  # four blocks of 16 tokens


def hashes(n: int, base: int) -> list[int]:
    return [base + i for i in range(n)]


@pytest.fixture(scope="module")
def bind_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def bound(bind_port: int) -> Iterator[Daemon]:
    """One daemon in bind mode shared by the tests below; each test uses its own pods."""
    with daemon({"zmq": {"endpoint": f"tcp://127.0.0.1:{bind_port}"}}) as running:
        yield running


def engine_for(bind_port: int, pod: str, **kwargs: object) -> Engine:
    engine = Engine(f"kv@{pod}@{MODEL}", connect=f"tcp://127.0.0.1:{bind_port}", **kwargs)  # type: ignore[arg-type]
    engine.wait_subscribed()
    return engine


def test_store_remove_clear_in_bind_mode(bound: Daemon, bind_port: int) -> None:
    engine = engine_for(bind_port, "10.0.0.1:8000")
    try:
        h = hashes(4, 1 << 40)
        engine.publish([stored(h, PROMPT)])
        wait_for(lambda: bound.matches(MODEL, PROMPT).get("10.0.0.1:8000") == 4, what="store")
        answer = bound.locality(MODEL, PROMPT)
        assert answer["block_size"] == 16
        assert answer["total_blocks"] == 4
        (pod,) = [p for p in answer["pods"] if p["pod_id"] == "10.0.0.1:8000"]
        assert pod["matched_tokens"] == 64
        assert pod["tiers"] == {"gpu": 4}
        assert pod["score"] == 1.0

        engine.publish([removed(h[2:])])
        wait_for(lambda: bound.matches(MODEL, PROMPT).get("10.0.0.1:8000") == 2, what="remove")

        engine.publish([cleared()])
        wait_for(lambda: "10.0.0.1:8000" not in bound.matches(MODEL, PROMPT), what="clear")
    finally:
        engine.close()


def test_vllm_023_arrays_with_lora_cpu_tier_and_dp_rank(bound: Daemon, bind_port: int) -> None:
    engine = engine_for(bind_port, "10.0.0.2:8000", version="0.23")
    try:
        h = hashes(4, 2 << 40)
        engine.publish(
            [stored(h, PROMPT, lora_name="sql-adapter", extra_keys=[("sql-adapter",)] * 4)]
        )
        engine.publish([stored(h[:2], (), block_size=0, medium="CPU")])
        engine.publish([stored(hashes(2, 3 << 40), PROMPT[:32])], dp_rank=1)
        wait_for(
            lambda: bound.matches(MODEL, PROMPT, lora_name="sql-adapter").get("10.0.0.2:8000"),
            what="lora store",
        )
        answer = bound.locality(MODEL, PROMPT, lora_name="sql-adapter")
        (pod,) = [p for p in answer["pods"] if p["pod_id"] == "10.0.0.2:8000"]
        assert pod["tiers"] == {"gpu": 4, "cpu": 2}
        # Without the adapter the same tokens are other blocks; rank 1 holds two of them.
        wait_for(lambda: bound.matches(MODEL, PROMPT).get("10.0.0.2:8000@dp1") == 2, what="dp1")
        scores = bound.http.post("/v1/score", json={"model": MODEL, "token_ids": PROMPT}).json()
        assert scores["scores"]["10.0.0.2:8000@dp1"] == 0.5
        assert "10.0.0.2:8000" not in scores["scores"]
    finally:
        engine.close()


def test_garbage_is_counted_and_skipped_alone(bound: Daemon, bind_port: int) -> None:
    engine = engine_for(bind_port, "10.0.0.3:8000")
    try:
        before_bad = bound.metric("kv_cache_event_decode_errors_total", reason="msgpack")
        before_frames = bound.metric("kv_cache_event_decode_errors_total", reason="bad_frame")
        before_events = bound.metric("kv_cache_event_decode_errors_total", reason="bad_hash")
        before_unknown = bound.metric("kv_cache_event_decode_errors_total", reason="unknown_type")
        engine.publish_raw(os.urandom(64))  # not msgpack
        engine.send_frames([b"kv@10.0.0.3:8000@" + MODEL.encode(), b"short"])  # 2 frames
        engine.send_frames([b"kv@10.0.0.3:8000@" + MODEL.encode(), b"123", b"x"])  # bad seq
        engine.publish_raw(pack({"not": "a batch"}))
        good = stored(hashes(2, 4 << 40), PROMPT[:32])
        bad_hash = raw(["BlockStored", ["x"], None, [], 16, None, None])
        engine.publish([bad_hash, good, raw({"type": "FutureEvent"})])
        wait_for(lambda: bound.matches(MODEL, PROMPT).get("10.0.0.3:8000") == 2, what="good")
        assert bound.metric("kv_cache_event_decode_errors_total", reason="msgpack") > before_bad
        assert (
            bound.metric("kv_cache_event_decode_errors_total", reason="bad_frame")
            >= before_frames + 2
        )
        assert bound.metric("kv_cache_event_decode_errors_total", reason="bad_hash") > before_events
        assert (
            bound.metric("kv_cache_event_decode_errors_total", reason="unknown_type")
            > before_unknown
        )
        assert bound.http.get("/healthz").status_code == 200
    finally:
        engine.close()


def test_unidentified_topic_is_dropped_and_counted(bound: Daemon, bind_port: int) -> None:
    engine = Engine("kv@", connect=f"tcp://127.0.0.1:{bind_port}")
    engine.wait_subscribed()
    try:
        before = bound.metric("kv_cache_event_decode_errors_total", reason="unidentified")
        engine.publish([stored(hashes(1, 5 << 40), PROMPT[:16])])
        wait_for(
            lambda: (
                bound.metric("kv_cache_event_decode_errors_total", reason="unidentified") > before
            ),
            what="unidentified count",
        )
        assert "set the engine's topic" in bound.logs()
    finally:
        engine.close()


def test_gap_without_replay_is_counted_as_loss(bound: Daemon, bind_port: int) -> None:
    engine = engine_for(bind_port, "10.0.0.4:8000")
    try:
        engine.publish([stored(hashes(1, 6 << 40), PROMPT[:16])])
        engine.publish([stored(hashes(1, 6 << 40 | 1), PROMPT[16:32], parent=6 << 40)], send=False)
        engine.publish([stored(hashes(4, 7 << 40), PROMPT)])
        wait_for(lambda: bound.matches(MODEL, PROMPT).get("10.0.0.4:8000") == 4, what="after gap")
        assert bound.metric("kv_cache_lost_batches_total", pod="10.0.0.4:8000") == 1
        pods = bound.http.get("/v1/pods").json()["pods"]
        (status,) = [p for p in pods if p["pod_id"] == "10.0.0.4:8000"]
        assert (status["gaps"], status["lost_batches"], status["last_seq"]) == (1, 1, 2)
    finally:
        engine.close()


def test_connect_mode_replays_on_first_contact_on_gaps_and_after_restart() -> None:
    pub, replay = free_port(), free_port()
    pod = "10.0.1.1:8000"
    engine = Engine(
        f"kv@{pod}@{MODEL}",
        bind=f"tcp://127.0.0.1:{pub}",
        replay_bind=f"tcp://127.0.0.1:{replay}",
        replay_shape="0.25",
    )
    h = hashes(4, 8 << 40)
    # Published before the service existed: only a replay can bring these.
    engine.publish([stored(h[:2], PROMPT[:32])], send=False)
    config = {
        "zmq": {
            "endpoint": "",
            "pods": [
                {
                    "pod_id": pod,
                    "endpoint": f"tcp://127.0.0.1:{pub}",
                    "replay_endpoint": f"tcp://127.0.0.1:{replay}",
                }
            ],
        }
    }
    try:
        with daemon(config) as running:
            engine.wait_subscribed()
            engine.publish([stored(h[2:3], PROMPT[32:48], parent=h[1])])
            wait_for(lambda: running.matches(MODEL, PROMPT).get(pod) == 3, what="first contact")
            assert engine.replay_requests == [0]

            engine.publish([stored(h[3:], PROMPT[48:], parent=h[2])], send=False)  # lost
            engine.publish([stored(hashes(1, 9 << 40), list(range(16)))])
            wait_for(lambda: running.matches(MODEL, PROMPT).get(pod) == 4, what="gap replay")
            assert engine.replay_requests == [0, 2]
            assert running.metric("kv_cache_lost_batches_total", pod=pod) == 0

            # The engine restarts: sequence numbers start again at 0, its cache is empty.
            engine.buffer.clear()
            engine.publish([stored(hashes(1, 10 << 40), list(range(100, 116)))], seq=0)
            wait_for(lambda: pod not in running.matches(MODEL, PROMPT), what="restart clear")
            # The restarted engine's blocks come in by the replay from 0 that follows.
            wait_for(
                lambda: running.matches(MODEL, list(range(100, 116))) == {pod: 1},
                what="replay after restart",
            )
            assert running.metric("kv_cache_engine_restarts_total", pod=pod) == 1
            pods = running.http.get("/v1/pods").json()["pods"]
            assert [(p["pod_id"], p["restarts"], p["replays"]) for p in pods] == [(pod, 1, 3)]
    finally:
        engine.close()


def test_vllm_key_mode_reports_hash_mismatch_without_going_unready() -> None:
    port = free_port()
    config = {
        "zmq": {"endpoint": f"tcp://127.0.0.1:{port}"},
        "models": [{"name": MODEL, "key_mode": "vllm", "hash_seed": 0}],
    }
    tokens = list(range(1000, 1032))
    with daemon(config) as running:
        engine = Engine(f"kv@10.0.2.1:8000@{MODEL}", connect=f"tcp://127.0.0.1:{port}")
        try:
            engine.wait_subscribed()
            # PYTHONHASHSEED=0 hashes (CONTRACT.md): these match our configuration.
            engine.publish([stored([16823396573910764246, 9852303496387231819], tokens)])
            wait_for(lambda: running.matches(MODEL, tokens), what="vllm store")
            assert running.http.get("/readyz").json().get("warnings") == []
            # Hashes from an engine with another seed: indexed, but reported.
            engine.publish([stored([7322446309363477352, 17027874615116373601], tokens)])
            wait_for(
                lambda: running.metric("kv_cache_hash_mismatches_total", model=MODEL) == 1,
                what="mismatch metric",
            )
            ready = running.http.get("/readyz")
            assert ready.status_code == 200
            assert "hash_seed" in " ".join(ready.json()["warnings"])
            prefix = "7322446309363477352,17027874615116373601"
            by_hash = running.http.get("/v1/locality", params={"model": MODEL, "prefix": prefix})
            assert by_hash.json()["pods"][0]["match_length"] == 2
        finally:
            engine.close()


def test_sigterm_exits_cleanly_within_five_seconds() -> None:
    running = Daemon({"zmq": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}})
    start = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    code = running.process.wait(10)
    elapsed = time.monotonic() - start
    logs = running.logs()
    running.stop()
    assert code == 0, logs
    assert elapsed < 5.0
    assert '"stopped"' in logs


def test_a_taken_http_port_exits_1_naming_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_CACHE_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                *("--api-host", "127.0.0.1", "--api-port", str(port)),
                *("--grpc-host", "127.0.0.1", "--grpc-port", str(free_port())),
                *("--zmq-endpoint", f"tcp://127.0.0.1:{free_port()}"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1, result.stderr.decode()[-2000:]  # not a crash at exit
    assert f"cannot serve HTTP on 127.0.0.1:{port}".encode() in result.stderr


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"token_ids": [1, 2]}, 422),  # no model
        ({"model": MODEL}, 400),  # no prompt at all
        ({"model": MODEL, "token_ids": [1], "block_hashes": [1]}, 400),
        ({"model": MODEL, "token_ids": [-1]}, 400),
        ({"model": MODEL, "token_ids": [2**32]}, 400),
        ({"model": MODEL, "token_ids": ["a"]}, 422),
        ({"model": MODEL, "prompt": "hello"}, 422),  # no tokenizer configured
        ({"model": MODEL, "token_ids": list(range(200_000))}, 413),
    ],
)
def test_bad_rest_requests_get_4xx_naming_the_problem(
    bound: Daemon, body: dict[str, object], status: int
) -> None:
    response = bound.http.post("/v1/locality", json=body)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_bad_grpc_requests_get_invalid_argument_and_the_daemon_keeps_serving(
    bound: Daemon,
) -> None:
    import grpc

    from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc

    with grpc.insecure_channel(bound.grpc_target) as channel:
        stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
        cases = [
            (kvcache_pb2.LocalityRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT),
            (kvcache_pb2.LocalityRequest(token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT),
            (
                kvcache_pb2.LocalityRequest(model=MODEL, token_ids=list(range(200_000))),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ),
            (
                kvcache_pb2.LocalityRequest(model=MODEL, prompt="hi"),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
        ]
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Locality(request, timeout=5)
            assert raised.value.code() == code
            assert raised.value.details()
        answer = stub.Locality(
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids=PROMPT), timeout=5
        )
        assert answer.total_blocks == 4


def metric_types(text: str) -> dict[str, str]:
    """Metric family -> type, from the ``# TYPE`` lines of a scrape."""
    return {
        parts[2]: parts[3]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and len(parts := line.split()) == 4
    }


def test_contract_metrics_are_exported(bound: Daemon) -> None:
    text = bound.http.get("/metrics").text
    types = metric_types(text)
    expected = {
        "kv_cache_blocks": "gauge",  # formerly kv_cache_blocks_total (CONTRACT.md section 5)
        "kv_cache_events_received_total": "counter",
        "kv_cache_query_duration_seconds": "histogram",
        "kv_cache_hit_ratio": "gauge",
        "kv_cache_pods_tracked": "gauge",
        "kv_cache_event_decode_errors_total": "counter",
        "kv_cache_sequence_gaps_total": "counter",
        "kv_cache_lost_batches_total": "counter",
        "kv_cache_replays_total": "counter",
        "kv_cache_evictions_total": "counter",
        "kv_cache_event_lag_seconds": "gauge",
        "kv_cache_event_visible_lag_seconds": "histogram",
        "kv_cache_hash_mismatches_total": "counter",
        "kv_cache_ingest_buffer_bytes": "gauge",
        "kv_cache_ingest_buffer_frames": "gauge",
        "kv_cache_ingest_buffer_limit_bytes": "gauge",
        "kv_cache_frames_dropped_total": "counter",
        "kv_cache_build_info": "gauge",
    }
    assert {name: types.get(name) for name in expected} == expected
    for gone in ("kv_cache_blocks_total", "kv_cache_ingest_queue_depth"):
        assert gone not in types
    assert bound.metric("kv_cache_events_received_total", type="BlockStored") > 0
    assert bound.metric("kv_cache_ingest_buffer_limit_bytes") == 256 * 1024 * 1024
    for reason in ("buffer_full", "limit", "pod_dropped", "unidentified"):
        assert f'kv_cache_event_decode_errors_total{{reason="{reason}"}}' in text
    # The daemon runs the native data plane unless told otherwise.
    (info,) = [line for line in text.splitlines() if line.startswith("kv_cache_build_info{")]
    assert 'data_plane="native"' in info and info.endswith(" 1.0")


def test_the_python_data_plane_answers_and_says_it_is_not_for_production() -> None:
    port = free_port()
    config = {
        "data_plane": "python",
        "zmq": {"endpoint": f"tcp://127.0.0.1:{port}", "buffer_bytes": "1MiB"},
    }
    with daemon(config) as running:
        engine = Engine(f"kv@10.0.3.1:8000@{MODEL}", connect=f"tcp://127.0.0.1:{port}")
        try:
            engine.wait_subscribed()
            engine.publish([stored(hashes(4, 12 << 40), PROMPT)])
            wait_for(lambda: running.matches(MODEL, PROMPT) == {"10.0.3.1:8000": 4}, what="store")
        finally:
            engine.close()
        ready = running.http.get("/readyz")
        assert ready.status_code == 200
        (warning,) = ready.json()["warnings"]
        assert "data_plane is 'python'" in warning
        assert running.metric("kv_cache_ingest_buffer_limit_bytes") == 1024 * 1024
        text = running.http.get("/metrics").text
        (info,) = [line for line in text.splitlines() if line.startswith("kv_cache_build_info{")]
        assert 'data_plane="python"' in info
        assert '"data_plane": "python"' in running.logs()
