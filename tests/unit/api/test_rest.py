"""The REST API over a real uvicorn server, a real QueryService and a real data plane.

The plane is fed the way the daemon feeds it, with vLLM wire bytes (tests/support/planes.py).
Tests that check answers (``served``) run against both data planes, native and the Python
reference; tests of the edge alone (``edge``: validation, limits, routes) against the native
one. Each server listens on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any, cast

import httpx
import prometheus_client
import pytest
import uvicorn

from service.api.query import LocalityAnswer, QueryService
from service.api.rest import create_rest_app
from service.api.rest_models import (
    ErrorResponse,
    LocalityResponse,
    ModelsResponse,
    PodsResponse,
    ScoreResponse,
)
from service.dataplane.protocol import DataPlaneKind
from service.errors import Unavailable
from service.index.protocol import BlockIndex, PodMatch, PodRank
from service.index.reference import ReferenceIndex
from service.readiness import PYTHON_PLANE_WARNING, ServiceStatus
from service.status import ModelStatus, PodStatus, Readiness, StatusSource
from tests.support.planes import PLANES, Feeder, make_plane
from tests.support.vllm_wire import removed, stored

MODEL = "m"
POD_A = "10.0.0.7:8000"  # 20 blocks: 16 on GPU, then 4 offloaded to CPU
POD_B = "10.0.0.8:8000"  # rank 1: the first 8 blocks on GPU
POD_C = "10.0.0.6:8000"  # the first 8 blocks on GPU
TOKENS = list(range(1000, 1512))  # 32 blocks of 16
HASHES = [0xABCD_0000_0000_0000 + i for i in range(32)]
MAX_TOKENS = 1024
MAX_BODY = 64 * 1024
READY = Readiness(True, warnings=("model m: hash mismatches",))


class StandInStatus:
    """A StatusSource whose answers the test chooses."""

    def __init__(
        self,
        readiness: Readiness | Exception = READY,
    ) -> None:
        self.readiness_answer = readiness
        self.pod = PodStatus(POD_B, 1, MODEL, 8, "live", 1_700_000_000.5, 41, 42, 1, 3, 1, 0)
        self.model = ModelStatus(MODEL, "tokens", False, 16, 36, 3, 0, 0)

    async def pods(self) -> list[PodStatus]:
        return [self.pod]

    async def models(self) -> list[ModelStatus]:
        return [self.model]

    async def readiness(self) -> Readiness:
        if isinstance(self.readiness_answer, Exception):
            raise self.readiness_answer
        return self.readiness_answer


class DownIndex(ReferenceIndex):
    """An index whose backend is unreachable (under the Python plane)."""

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        raise Unavailable("index backend unreachable: redis://redis:6379/0")


class QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: the test owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def populated(feeder: Feeder) -> None:
    await feeder.send(POD_A, stored(HASHES[:20], TOKENS[:320]))
    await feeder.send(POD_A, stored(HASHES[16:20], medium="CPU", block_size=0))
    await feeder.send(POD_A, removed(HASHES[16:20]))
    await feeder.send(POD_B, stored(HASHES[:8], TOKENS[:128]), rank=1)
    await feeder.send(POD_C, stored(HASHES[:8], TOKENS[:128]))


@dataclasses.dataclass
class Served:
    """A running server and what it was built with."""

    url: str
    kind: DataPlaneKind
    status: StatusSource
    registry: prometheus_client.CollectorRegistry
    observed: list[str]  # the ``api`` of every query, as QueryService reports it


@contextlib.contextmanager
def running(
    kind: DataPlaneKind = "native",
    status: StatusSource | None = None,
    index: BlockIndex | None = None,
) -> Iterator[Served]:
    """Serve a populated plane on 127.0.0.1:0 from a thread with its own event loop.

    ``status`` replaces the plane's own (a ``ServiceStatus``, started)."""
    registry = prometheus_client.CollectorRegistry()
    observed: list[str] = []
    servers: list[uvicorn.Server] = []
    failures: list[BaseException] = []
    statuses: list[StatusSource] = []

    def observe(api: str, seconds: float, answer: LocalityAnswer | None) -> None:
        observed.append(api)

    async def main() -> None:
        plane = make_plane(kind, index=index)
        try:
            await populated(Feeder(plane, MODEL))
            own = ServiceStatus(plane)
            own.started = True
            statuses.append(status or own)
            queries = QueryService(
                plane, max_tokens=MAX_TOKENS, observe=observe, status=statuses[0]
            )
            app = create_rest_app(queries, registry, max_body_bytes=MAX_BODY)
            config = uvicorn.Config(
                app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
            )
            servers.append(QuietServer(config))
            await servers[0].serve()
        finally:
            await plane.stop()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=thread_main, name="rest-test-server", daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if (servers and servers[0].started) or not thread.is_alive():
                break
            time.sleep(0.01)
        assert not failures, failures
        assert servers and servers[0].started, "uvicorn did not start"
        port = servers[0].servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", kind, statuses[0], registry, observed)
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(5)
        assert not thread.is_alive(), "uvicorn did not stop"
        assert not failures, failures


@pytest.fixture(scope="module", params=PLANES)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A server per data plane, for the tests that check answers and leave its setup alone."""
    with running(cast(DataPlaneKind, request.param)) as served:
        yield served


@pytest.fixture(scope="module")
def edge() -> Iterator[Served]:
    """One server (native plane) for the tests of the HTTP edge alone: what they check is
    decided before any data plane is asked."""
    with running() as served:
        yield served


def talk(url: str, client: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """Run ``client`` against the server at ``url``."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            await client(http)

    asyncio.run(scenario())


def exchange(
    served: Served, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, dict[str, Any]]:
    """One request; the response and its JSON body (an object)."""
    got: list[httpx.Response] = []

    async def client(http: httpx.AsyncClient) -> None:
        got.append(await http.request(method, url, **kwargs))

    talk(served.url, client)
    body = got[0].json()
    assert isinstance(body, dict)
    return got[0], body


def test_locality_answers_the_contract_example(served: Served) -> None:
    before = len(served.observed)
    response, body = exchange(
        served, "POST", "/v1/locality", json={"model": MODEL, "token_ids": TOKENS}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert body == {
        "model": MODEL,
        "block_size": 16,
        "total_blocks": 32,
        "cache_hits": 20,
        "coverage": 0.625,
        "pods": [
            {
                "pod_id": POD_A,
                "dp_rank": 0,
                "match_length": 20,
                "matched_tokens": 320,
                "block_count": 20,
                "tiers": {"gpu": 16, "cpu": 4},
                "score": pytest.approx(0.6),
            },
            # Equal scores sort by pod_id.
            {
                "pod_id": POD_C,
                "dp_rank": 0,
                "match_length": 8,
                "matched_tokens": 128,
                "block_count": 8,
                "tiers": {"gpu": 8},
                "score": 0.25,
            },
            {
                "pod_id": POD_B,
                "dp_rank": 1,
                "match_length": 8,
                "matched_tokens": 128,
                "block_count": 8,
                "tiers": {"gpu": 8},
                "score": 0.25,
            },
        ],
    }
    assert LocalityResponse.model_validate(body).model_dump(mode="json") == body
    assert served.observed[before:] == ["rest"]


def test_candidates_appear_with_zero_scores(served: Served) -> None:
    body = {"model": MODEL, "token_ids": TOKENS[:64], "pods": ["10.0.0.99:8000", POD_A]}
    response, answer = exchange(served, "POST", "/v1/locality", json=body)
    assert response.status_code == 200
    assert [(p["pod_id"], p["match_length"], p["tiers"], p["score"]) for p in answer["pods"]] == [
        (POD_A, 4, {"gpu": 4}, 1.0),
        ("10.0.0.99:8000", 0, {}, 0.0),
    ]


def test_get_prefix_resolves_engine_hashes_through_the_translator(served: Served) -> None:
    prefix = ",".join(str(h) for h in HASHES[:20])
    response, body = exchange(
        served, "GET", f"/v1/locality?model={MODEL}&prefix={prefix}&pods={POD_A}"
    )
    assert response.status_code == 200
    assert (body["block_size"], body["total_blocks"], body["cache_hits"]) == (16, 20, 20)
    (pod,) = body["pods"]
    assert (pod["pod_id"], pod["tiers"], pod["score"]) == (
        POD_A,
        {"gpu": 16, "cpu": 4},
        pytest.approx(0.96),
    )


def test_get_prefix_stops_at_the_first_unseen_hash(served: Served) -> None:
    prefix = f"{HASHES[0]},{HASHES[1]},12345,{HASHES[3]}"
    response, body = exchange(
        served, "GET", "/v1/locality", params={"model": MODEL, "prefix": prefix}
    )
    assert response.status_code == 200
    assert (body["total_blocks"], body["cache_hits"]) == (4, 2)


def test_score_keys_name_the_data_parallel_rank(served: Served) -> None:
    response, body = exchange(
        served, "POST", "/v1/score", json={"model": MODEL, "token_ids": TOKENS}
    )
    assert response.status_code == 200
    assert body == {
        "model": MODEL,
        "scores": {POD_A: pytest.approx(0.6), POD_C: 0.25, f"{POD_B}@dp1": 0.25},
    }
    assert ScoreResponse.model_validate(body)


def test_unknown_model_answers_empty(served: Served) -> None:
    response, body = exchange(
        served, "POST", "/v1/locality", json={"model": "other", "token_ids": TOKENS}
    )
    assert response.status_code == 200
    assert body == {
        "model": "other",
        "block_size": None,
        "total_blocks": 0,
        "cache_hits": 0,
        "coverage": 0.0,
        "pods": [],
    }


BAD_BODIES: list[tuple[Any, int, str]] = [
    ({"token_ids": [1]}, 422, "model: Field required"),
    ({"model": ""}, 422, "model: String should have at least 1 character"),
    ({"model": 7, "token_ids": [1]}, 422, "model: Input should be a valid string"),
    ({"model": MODEL}, 400, "exactly one of token_ids, block_hashes, prompt or messages"),
    ({"model": MODEL, "token_ids": [1], "prompt": "x"}, 400, "(got token_ids, prompt)"),
    ({"model": MODEL, "token_ids": [1, -1]}, 400, "token_ids[1] = -1 is not an int in [0, 2**32)"),
    ({"model": MODEL, "token_ids": [1, 2**32]}, 400, "token_ids[1] = 4294967296 is not an int"),
    ({"model": "other", "token_ids": [1, -1]}, 400, "token_ids[1] = -1"),
    ({"model": MODEL, "token_ids": [1, "a"]}, 422, "token_ids[1]: Input should be a valid integer"),
    ({"model": MODEL, "token_ids": [1, 1.5]}, 422, "token_ids[1]: Input should be a valid integer"),
    ({"model": MODEL, "token_ids": [True]}, 422, "token_ids[0]: Input should be a valid integer"),
    ({"model": MODEL, "token_ids": "1 2"}, 422, "token_ids: Input should be a valid array"),
    ({"model": MODEL, "token_ids": [1], "lora": "x"}, 422, "lora: unknown field"),
    ({"model": MODEL, "block_hashes": [2**64]}, 400, "block_hashes[0] = 18446744073709551616"),
    ({"model": MODEL, "token_ids": [1], "pods": "a"}, 422, "pods: Input should be a valid array"),
    ({"model": MODEL, "token_ids": [1], "pods": [""]}, 400, "pods: '' is not a pod id"),
    ([MODEL], 422, "body: Input should be an object"),
]


@pytest.mark.parametrize(("body", "status", "detail"), BAD_BODIES)
def test_bad_bodies_get_4xx_naming_the_problem(
    edge: Served, body: Any, status: int, detail: str
) -> None:
    response, answer = exchange(edge, "POST", "/v1/locality", json=body)
    assert response.status_code == status
    assert detail in answer["detail"]
    ErrorResponse.model_validate(answer)


def test_validation_errors_list_each_bad_item_without_echoing_input(edge: Served) -> None:
    body = {"model": MODEL, "token_ids": ["secret-a", "secret-b", 3, "secret-c", "secret-d"]}
    response, answer = exchange(edge, "POST", "/v1/locality", json=body)
    assert response.status_code == 422
    assert answer["detail"].endswith("(and 1 more)")
    assert [e["loc"] for e in answer["errors"]] == [["body", "token_ids", i] for i in (0, 1, 3, 4)]
    assert "secret" not in response.text


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"", "request body is empty"),
        (b'{"model": "m", ', "request body is not valid JSON: EOF while parsing"),
        (b"\xff\xfe", "request body is not valid JSON"),
    ],
)
def test_malformed_json_gets_400(edge: Served, content: bytes, detail: str) -> None:
    response, answer = exchange(
        edge, "POST", "/v1/score", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert detail in answer["detail"]


@pytest.mark.parametrize(
    ("query", "status", "detail"),
    [
        (f"prefix={HASHES[0]}", 422, "model: Field required"),
        (f"model={MODEL}", 422, "prefix: Field required"),
        (f"model={MODEL}&prefix=1,x,3", 400, "prefix item 1 ('x') is not a decimal block hash"),
        (f"model={MODEL}&prefix=1,-2", 400, "prefix item 1 ('-2')"),
        (f"model={MODEL}&prefix=1,", 400, "prefix item 1 ('')"),
        (f"model={MODEL}&prefix=1%2C%D9%A3", 400, "prefix item 1"),  # an Arabic-Indic 3
        (f"model={MODEL}&prefix={2**64}", 400, "prefix item 0 ('18446744073709551616') exceeds"),
        (f"model={MODEL}&prefix={'9' * 5000}", 400, "prefix item 0"),
        (f"model={MODEL}&prefix=1&lora_name=x", 400, "unknown query parameter(s) lora_name"),
    ],
)
def test_bad_prefix_queries_get_4xx(edge: Served, query: str, status: int, detail: str) -> None:
    response, answer = exchange(edge, "GET", f"/v1/locality?{query}")
    assert response.status_code == status
    assert detail in answer["detail"]
    assert len(answer["detail"]) < 200


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_text_prompts_without_a_tokenizer_get_422(edge: Served, field: str) -> None:
    text: Any = "hello" if field == "prompt" else [{"role": "user", "content": "hello"}]
    response, answer = exchange(edge, "POST", "/v1/locality", json={"model": MODEL, field: text})
    assert response.status_code == 422
    assert "tokenizer" in answer["detail"]


def test_too_many_tokens_get_413(edge: Served) -> None:
    body = {"model": MODEL, "token_ids": [1] * (MAX_TOKENS + 1)}
    response, answer = exchange(edge, "POST", "/v1/locality", json=body)
    assert response.status_code == 413
    assert "api.max_tokens" in answer["detail"]


def test_oversized_bodies_get_413_whether_declared_or_streamed(edge: Served) -> None:
    oversized = b'{"model": "m", "token_ids": [' + b"1," * MAX_BODY + b"1]}"
    got: list[httpx.Response] = []

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(oversized), 4096):
            yield oversized[start : start + 4096]

    async def client(http: httpx.AsyncClient) -> None:
        got.append(await http.post("/v1/locality", content=oversized))
        got.append(await http.post("/v1/locality", content=chunks()))
        got.append(await http.get("/healthz"))  # the server still answers

    talk(edge.url, client)
    declared, streamed, health = got
    assert "content-length" in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    for response in (declared, streamed):
        assert response.status_code == 413
        assert "api.max_body_bytes" in response.json()["detail"]
    assert health.status_code == 200


def test_unavailable_index_gets_503() -> None:
    with running("python", index=DownIndex()) as down:
        body = {"model": MODEL, "token_ids": TOKENS}
        response, answer = exchange(down, "POST", "/v1/locality", json=body)
    assert response.status_code == 503
    assert answer == {"detail": "index backend unreachable: redis://redis:6379/0"}


def test_unexpected_errors_get_a_generic_500() -> None:
    status = StandInStatus()

    async def broken() -> list[PodStatus]:
        raise RuntimeError("secret internals")

    status.pods = broken  # type: ignore[method-assign]
    with running(status=status) as failing:
        response, answer = exchange(failing, "GET", "/v1/pods")
    assert response.status_code == 500
    assert answer == {"detail": "internal error; see the service log"}


def test_pods_and_models_list_what_is_tracked(served: Served) -> None:
    _, pods = exchange(served, "GET", "/v1/pods")
    _, models = exchange(served, "GET", "/v1/models")
    assert PodsResponse.model_validate(pods) and ModelsResponse.model_validate(models)
    listed = pods["pods"]
    for pod in listed:
        assert pod.pop("last_event_time") == pytest.approx(time.time(), abs=60)
    common = {"model": MODEL, "state": "live", "gaps": 0, "lost_batches": 0, "replays": 0}
    common |= {"restarts": 0, "dropped": 0}
    # Sorted by pod id, then rank; POD_A's CPU copies and removed GPU copies are one block.
    assert listed == [
        {"pod_id": POD_C, "dp_rank": 0, "blocks": 8, "last_seq": 0, "batches": 1, **common},
        {"pod_id": POD_A, "dp_rank": 0, "blocks": 20, "last_seq": 2, "batches": 3, **common},
        {"pod_id": POD_B, "dp_rank": 1, "blocks": 8, "last_seq": 0, "batches": 1, **common},
    ]
    assert models == {
        "models": [
            {
                "name": MODEL,
                "key_mode": "tokens",
                "configured": False,
                "block_size": 16,
                "blocks": 36,
                "pods": 3,
                "hash_matches": 0,
                "hash_mismatches": 0,
            }
        ]
    }


def test_pods_and_models_render_the_status_source() -> None:
    status = StandInStatus()
    with running(status=status) as stand_in:
        _, pods = exchange(stand_in, "GET", "/v1/pods")
        _, models = exchange(stand_in, "GET", "/v1/models")
    assert pods == {"pods": [dataclasses.asdict(status.pod)]}
    assert pods["pods"][0]["dp_rank"] == 1
    assert models == {"models": [dataclasses.asdict(status.model)]}


def test_healthz_and_readyz_when_ready(served: Served) -> None:
    health, answer = exchange(served, "GET", "/healthz")
    assert (health.status_code, answer) == (200, {"status": "ok"})
    readiness, answer = exchange(served, "GET", "/readyz")
    # The Python plane answers, and says it is not the one to run in production.
    warnings = [PYTHON_PLANE_WARNING] if served.kind == "python" else []
    assert (readiness.status_code, answer) == (200, {"status": "ready", "warnings": warnings})


def test_readyz_lists_the_status_warnings() -> None:
    with running(status=StandInStatus()) as stand_in:
        readiness, answer = exchange(stand_in, "GET", "/readyz")
    assert (readiness.status_code, answer) == (
        200,
        {"status": "ready", "warnings": ["model m: hash mismatches"]},
    )


@pytest.mark.parametrize(
    ("readiness", "reasons"),
    [
        (Readiness(False, ("index backend unreachable",)), ["index backend unreachable"]),
        (RuntimeError("boom"), ["readiness check failed; see the service log"]),
    ],
)
def test_readyz_503_with_reasons(readiness: Readiness | Exception, reasons: list[str]) -> None:
    with running(status=StandInStatus(readiness)) as unready:
        readyz, answer = exchange(unready, "GET", "/readyz")
        healthz, _ = exchange(unready, "GET", "/healthz")
    assert readyz.status_code == 503
    assert answer == {"status": "not ready", "reasons": reasons, "warnings": []}
    assert healthz.status_code == 200


def test_metrics_exposes_the_registry(edge: Served) -> None:
    counter = prometheus_client.Counter(
        "kv_cache_test_events", "Events", ["type"], registry=edge.registry
    )
    counter.labels("BlockStored").inc(3)
    got: list[httpx.Response] = []

    async def client(http: httpx.AsyncClient) -> None:
        got.append(await http.get("/metrics"))
        got.append(await http.get("/metrics", headers={"accept": "application/openmetrics-text"}))

    talk(edge.url, client)
    text, openmetrics = got
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'kv_cache_test_events_total{type="BlockStored"} 3.0' in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_openapi_documents_every_route(edge: Served) -> None:
    docs, _ = exchange(edge, "GET", "/openapi.json")
    paths = docs.json()["paths"]
    assert set(paths) >= {
        "/v1/locality",
        "/v1/score",
        "/v1/pods",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    post = paths["/v1/locality"]["post"]
    request = post["requestBody"]["content"]["application/json"]["schema"]
    assert request["additionalProperties"] is False
    assert request["properties"]["token_ids"]["anyOf"][0]["items"]["maximum"] == 2**32 - 1
    assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LocalityResponse"
    }
    assert set(post["responses"]) >= {"200", "400", "413", "422", "503"}
    assert {p["name"] for p in paths["/v1/locality"]["get"]["parameters"]} == {
        "model",
        "prefix",
        "pods",
    }

    async def client(http: httpx.AsyncClient) -> None:
        page = await http.get("/docs")
        assert page.status_code == 200
        assert "swagger-ui" in page.text

    talk(edge.url, client)
