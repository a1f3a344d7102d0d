"""The daemon's gRPC port, served by the native front (native/grpc_front.cpp): the hot path
answered natively must equal what the Python server answers for the same query (REST goes
through the same QueryService, so its answer is the reference here), and everything else
(errors, prompts, candidate pods, listings, health, reflection) must come back from the
Python server behind the front as it would directly."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from tests.e2e.harness import Daemon, Engine, daemon, free_port, wait_for
from tests.support.vllm_wire import stored

MODEL = "front-model"
BLOCK = 16
TOKENS = list(range(5000, 5000 + 40 * BLOCK))  # 40 blocks
PODS = {"10.0.3.1:8000": 40, "10.0.3.2:8000": 24, "10.0.3.3:8000": 8}


def hashes(pod: str, count: int) -> list[int]:
    base = (list(PODS).index(pod) + 1) << 32
    return [base + i for i in range(count)]


@pytest.fixture(scope="module")
def running() -> Iterator[Daemon]:
    port = free_port()
    with daemon({"zmq": {"endpoint": f"tcp://127.0.0.1:{port}"}}) as bound:
        for pod, blocks in PODS.items():
            engine = Engine(f"kv@{pod}@{MODEL}", connect=f"tcp://127.0.0.1:{port}")
            try:
                engine.wait_subscribed()
                engine.publish(
                    [stored(hashes(pod, blocks), TOKENS[: blocks * BLOCK], block_size=BLOCK)]
                )
                # On a second tier too, and for a LoRA adapter: more to tell answers apart.
                offload = stored(hashes(pod, 2), [], block_size=0, medium="CPU")
                lora = stored(
                    [9 << 40 | i for i in range(4)],
                    TOKENS[: 4 * BLOCK],
                    block_size=BLOCK,
                    lora_name="sql",
                )
                engine.publish([offload, lora])
                wait_for(lambda: pod in bound.matches(MODEL, TOKENS), what=pod)  # noqa: B023
            finally:
                engine.close()
        yield bound


@pytest.fixture(scope="module")
def stub(running: Daemon) -> Iterator[kvcache_pb2_grpc.KVCacheServiceStub]:
    with grpc.insecure_channel(running.grpc_target) as channel:
        yield kvcache_pb2_grpc.KVCacheServiceStub(channel)


def as_json(message: Any) -> dict[str, Any]:
    answer: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return answer


def rest_answer(running: Daemon, **query: Any) -> dict[str, Any]:
    response = running.http.post("/v1/locality", json={"model": MODEL, **query})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    for pod in body["pods"]:
        pod["tiers"] = {k: v for k, v in pod["tiers"].items() if v}
    if body["block_size"] is None:
        del body["block_size"]
    return body


QUERIES: list[dict[str, Any]] = [
    {"token_ids": TOKENS},
    {"token_ids": TOKENS[: 10 * BLOCK + 7]},  # a partial block at the end
    {"token_ids": TOKENS[:BLOCK]},
    {"token_ids": TOKENS, "lora_name": "sql"},
    {"token_ids": TOKENS, "cache_salt": "s"},
    {"token_ids": list(range(7, 7 + 4 * BLOCK))},  # held by nobody
    {"token_ids": TOKENS, "pods": ["10.0.3.2:8000", "10.0.9.9:8000"]},  # relayed
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("packed", [False, True])
def test_locality_over_grpc_is_the_rest_answer(
    running: Daemon, stub: kvcache_pb2_grpc.KVCacheServiceStub, query: dict[str, Any], packed: bool
) -> None:
    fields = dict(query)
    if packed:
        fields["token_ids_packed"] = array("I", fields.pop("token_ids")).tobytes()
    answer = as_json(stub.Locality(kvcache_pb2.LocalityRequest(model=MODEL, **fields)))
    expected = rest_answer(running, **query)
    assert answer == expected


def test_block_hash_queries_score_and_candidates_match_the_rest_answers(
    running: Daemon, stub: kvcache_pb2_grpc.KVCacheServiceStub
) -> None:
    chain = hashes("10.0.3.2:8000", 30)
    got = as_json(stub.Locality(kvcache_pb2.LocalityRequest(model=MODEL, block_hashes=chain)))
    prefix = ",".join(map(str, chain))
    expected = running.http.get("/v1/locality", params={"model": MODEL, "prefix": prefix}).json()
    for pod in expected["pods"]:
        pod["tiers"] = {k: v for k, v in pod["tiers"].items() if v}
    assert got == expected
    scores = stub.Score(kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS))
    rest_scores = running.http.post("/v1/score", json={"model": MODEL, "token_ids": TOKENS})
    assert dict(scores.scores) == rest_scores.json()["scores"]
    candidates = stub.GetCandidates(kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS))
    answer = rest_answer(running, token_ids=TOKENS)
    assert candidates.total_blocks == answer["total_blocks"]
    assert [(c.pod, c.score, c.match_length) for c in candidates.candidates] == [
        (p["pod_id"], p["score"], p["match_length"]) for p in answer["pods"]
    ]


def test_an_unknown_model_answers_empty(stub: kvcache_pb2_grpc.KVCacheServiceStub) -> None:
    answer = stub.Locality(kvcache_pb2.LocalityRequest(model="nobody", token_ids=TOKENS))
    assert (answer.model, answer.HasField("block_size"), list(answer.pods)) == (
        "nobody",
        False,
        [],
    )


@pytest.mark.parametrize(
    ("request_fields", "code", "detail"),
    [
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
        ({"token_ids": [1], "token_ids_packed": b"\0" * 4}, grpc.StatusCode.INVALID_ARGUMENT,
         "not both"),
        ({"token_ids_packed": b"\0" * 5}, grpc.StatusCode.INVALID_ARGUMENT, "whole number"),
        ({"token_ids": [1] * 200_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "api.max_tokens"),
        ({"block_hashes": [1], "lora_name": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "lora_name"),
        ({"prompt": "hello"}, grpc.StatusCode.FAILED_PRECONDITION, "tokenizer"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    ],
)  # fmt: skip
def test_what_the_front_does_not_answer_the_python_server_answers(
    stub: kvcache_pb2_grpc.KVCacheServiceStub,
    request_fields: dict[str, Any],
    code: grpc.StatusCode,
    detail: str,
) -> None:
    fields = {"model": MODEL, **request_fields}
    with pytest.raises(grpc.RpcError) as raised:
        stub.Locality(kvcache_pb2.LocalityRequest(**fields))
    assert raised.value.code() == code
    assert detail in (raised.value.details() or "")


def test_listings_health_and_reflection_come_through_the_front(running: Daemon) -> None:
    with grpc.insecure_channel(running.grpc_target) as channel:
        pods = kvcache_pb2_grpc.KVCacheServiceStub(channel).ListPods(kvcache_pb2.ListPodsRequest())
        assert {p.pod_id for p in pods.pods} == set(PODS)
        health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs lack the methods
        for service in ("", "kvcache.v1.KVCacheService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # untyped
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {"kvcache.v1.KVCacheService", "grpc.health.v1.Health"} <= names


def test_the_hot_path_is_answered_by_the_front_and_counted(
    running: Daemon, stub: kvcache_pb2_grpc.KVCacheServiceStub
) -> None:
    queries = running.metric("kv_cache_query_duration_seconds_count", api="grpc")
    relayed = running.metric("kv_cache_relayed_requests_total", api="grpc")
    for _ in range(3):
        stub.Locality(kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS))
    assert running.metric("kv_cache_query_duration_seconds_count", api="grpc") == queries + 3
    assert running.metric("kv_cache_relayed_requests_total", api="grpc") == relayed
    stub.Locality(kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS, pods=["x"]))
    assert running.metric("kv_cache_relayed_requests_total", api="grpc") == relayed + 1
