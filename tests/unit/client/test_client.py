"""Both clients against a real grpc.aio server over a real QueryService and data plane fed
vLLM wire bytes (tests/unit/api/test_grpc.py's fixtures), compared with the REST API. Tests
that check answers run against both data planes.

pytest-asyncio is not a dependency: each test runs its coroutine with ``asyncio.run``, and the
blocking client calls from a worker thread, so the server's loop keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import socket
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import prometheus_client
import pytest

from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.api.grpc_server import GrpcApi
from service.api.query import QueryService
from service.api.rest import create_rest_app
from service.client import (
    AsyncKVCacheClient,
    Candidate,
    InvalidRequest,
    KVCacheClient,
    KVCacheError,
    Locality,
    ModelStatus,
    PodStatus,
    RequestTooLarge,
    ServiceUnavailable,
    Unsupported,
)
from service.dataplane.protocol import DataPlaneKind
from service.errors import Unavailable
from service.index.protocol import PodMatch, PodRank
from service.index.reference import ReferenceIndex
from tests.support.vllm_wire import stored
from tests.unit.api.test_grpc import (
    HASHES,
    MAX_MESSAGE_BYTES,
    MAX_TOKENS,
    MODEL,
    TOKENS,
    A,
    B,
    C,
    FailingIndex,
    Fed,
    Status,
    fed,
)

PATIENT = 5.0  # seconds: tests that expect an answer must not fail on a busy machine
D = "10.0.0.6:8000"


@asynccontextmanager
async def serving(queries: QueryService, port: int = 0) -> AsyncIterator[str]:
    """The gRPC API over ``queries`` on 127.0.0.1; yields its target."""
    api = GrpcApi(queries, max_message_bytes=MAX_MESSAGE_BYTES)
    bound = await api.start("127.0.0.1", port)
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await api.stop(None)


async def both(
    target: str, method: str, *args: Any, packed: bool = True, **kwargs: Any
) -> tuple[Any, Any]:
    """``method`` answered by a KVCacheClient and by an AsyncKVCacheClient."""

    def blocking() -> Any:
        with KVCacheClient(target, timeout=PATIENT, packed_token_ids=packed) as client:
            return getattr(client, method)(*args, **kwargs)

    answer = await asyncio.to_thread(blocking)
    async with AsyncKVCacheClient(target, timeout=PATIENT, packed_token_ids=packed) as client:
        return answer, await getattr(client, method)(*args, **kwargs)


async def both_fail(
    target: str, method: str, *args: Any, **kwargs: Any
) -> tuple[KVCacheError, KVCacheError]:
    """The errors both clients raise for ``method``."""

    def blocking() -> KVCacheError:
        with KVCacheClient(target, timeout=PATIENT) as client, pytest.raises(KVCacheError) as e:
            getattr(client, method)(*args, **kwargs)
        return e.value

    error = await asyncio.to_thread(blocking)
    async with AsyncKVCacheClient(target, timeout=PATIENT) as client:
        with pytest.raises(KVCacheError) as caught:
            await getattr(client, method)(*args, **kwargs)
    return error, caught.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- answers --------------------------------------------------------------------------------


@asynccontextmanager
async def lora_and_salt(kind: DataPlaneKind) -> AsyncIterator[Fed]:
    """``fed``, plus the first two blocks of TOKENS under a LoRA adapter on pod C and under
    a cache salt on pod D."""
    async with fed(kind) as setup:
        await setup.feeder.send(C, stored([7, 8], TOKENS[:32], lora_name="sql-adapter", lora_id=1))
        await setup.feeder.send(D, stored([9, 10], TOKENS[:32], extra_keys=[("tenant-1",), None]))
        yield setup


CASES: list[tuple[dict[str, Any], list[str]]] = [
    # (request fields, the pods answered): each field must reach the server to get its answer.
    ({"token_ids": [*TOKENS, 1, 2, 3]}, [A, B]),
    ({"token_ids": TOKENS, "pods": [C, B]}, [B, C]),
    ({"block_hashes": HASHES[:2]}, [A, B]),
    ({"token_ids": TOKENS, "lora_name": "sql-adapter"}, [C]),
    ({"token_ids": TOKENS, "cache_salt": "tenant-1"}, [D]),
]


@pytest.mark.parametrize(("fields", "pods"), CASES)
def test_locality_is_the_rest_answer(
    kind: DataPlaneKind, fields: dict[str, Any], pods: list[str]
) -> None:
    async def main() -> None:
        async with lora_and_salt(kind) as setup:
            await compare(setup.queries)

    async def compare(queries: QueryService) -> None:
        app = create_rest_app(
            queries, prometheus_client.CollectorRegistry(), max_body_bytes=MAX_MESSAGE_BYTES
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://rest"
        ) as http:
            rest = (await http.post("/v1/locality", json={"model": MODEL, **fields})).json()
            rest_scores = (await http.post("/v1/score", json={"model": MODEL, **fields})).json()
        async with serving(queries) as target:
            localities = await both(target, "locality", MODEL, **fields)
            scores = await both(target, "score", MODEL, **fields)
            # Token ids as the repeated field (for services older than token_ids_packed).
            assert await both(target, "locality", MODEL, packed=False, **fields) == localities
        for locality in localities:
            assert isinstance(locality, Locality)
            assert json.loads(json.dumps(dataclasses.asdict(locality))) == rest
            assert [p.pod_id for p in locality.pods] == pods
        assert scores[0] == scores[1] == rest_scores["scores"]

    asyncio.run(main())


def test_locality_fields(kind: DataPlaneKind) -> None:
    async def main() -> None:
        async with fed(kind) as setup, serving(setup.queries) as target:
            first, second = await both(target, "locality", MODEL, TOKENS)
            unknown, _ = await both(target, "locality", "never-seen", TOKENS)
        assert first == second
        assert (first.block_size, first.total_blocks, first.cache_hits, first.coverage) == (
            16,
            4,
            4,
            1.0,
        )
        (a, b) = first.pods
        assert (a.pod_id, a.dp_rank, a.match_length, a.matched_tokens, a.block_count) == (
            A,
            0,
            4,
            64,
            4,
        )
        assert (a.tiers, a.score) == ({"gpu": 2, "cpu": 2}, pytest.approx(0.9))
        assert (b.pod_id, b.dp_rank, b.tiers, b.score) == (B, 1, {"gpu": 2}, 0.5)
        assert unknown == Locality("never-seen", None, 0, 0, 0.0, ())

    asyncio.run(main())


def test_candidates_rank_best_first_and_agree_with_score(kind: DataPlaneKind) -> None:
    async def main() -> None:
        async with fed(kind) as setup, serving(setup.queries) as target:
            every = await both(target, "candidates", MODEL, TOKENS)
            some = await both(target, "candidates", MODEL, TOKENS, pods=[C, A])
            (scores, _) = await both(target, "score", MODEL, TOKENS)
        for candidates in every:
            assert candidates == [
                Candidate(A, pytest.approx(0.9), 4),  # type: ignore[arg-type]
                Candidate(f"{B}@dp1", 0.5, 2),
            ]
            assert {c.pod: c.score for c in candidates} == scores
        for candidates in some:
            assert candidates == [Candidate(A, pytest.approx(0.9), 4), Candidate(C, 0.0, 0)]  # type: ignore[arg-type]

    asyncio.run(main())


def test_pods_and_models_are_the_status_source() -> None:
    pods = [
        PodStatus(A, 0, MODEL, 7, "live", 1_700_000_000.5, 41, 42, 1, 3, 1, 2),
        PodStatus(B, 1, None, 0, "replaying", None, None, 0, 0, 0, 0, 0),
    ]
    models = [
        ModelStatus(MODEL, "tokens", True, 16, 36, 3, 5, 0),
        ModelStatus("other", "vllm", False, None, 0, 0, 0, 1),
    ]

    async def main() -> None:
        status = Status(pod_list=pods, model_list=models)
        async with fed(status=status) as setup, serving(setup.queries) as target:
            assert await both(target, "pods") == (pods, pods)
            assert await both(target, "models") == (models, models)

    asyncio.run(main())


# -- errors ---------------------------------------------------------------------------------

ERRORS: list[tuple[tuple[Any, ...], dict[str, Any], type[KVCacheError], str]] = [
    ((MODEL,), {}, InvalidRequest, "give exactly one of token_ids"),
    # An empty list is "not given" over gRPC (proto3 cannot tell), unlike REST.
    ((MODEL, []), {}, InvalidRequest, "give exactly one of token_ids"),
    # An empty prompt is still a prompt: `optional` in the proto.
    ((MODEL, TOKENS), {"prompt": ""}, InvalidRequest, "(got token_ids, prompt)"),
    (("", TOKENS), {}, InvalidRequest, "model is required"),
    ((MODEL, TOKENS), {"pods": [A, ""]}, InvalidRequest, "pods: '' is not a pod id"),
    (
        (MODEL, [1] * (MAX_TOKENS + 1)),
        {},
        RequestTooLarge,
        f"{MAX_TOKENS + 1} token ids exceed api.max_tokens ({MAX_TOKENS})",
    ),
    ((MODEL,), {"prompt": "hello"}, Unsupported, "no tokenizer configured (models[].tokenizer)"),
    (
        (MODEL,),
        {"messages": [{"role": "user", "content": "hi"}]},
        Unsupported,
        "no tokenizer configured (models[].tokenizer)",
    ),
]
CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.mark.parametrize(("args", "kwargs", "kind", "message"), ERRORS)
def test_server_errors_raise_their_kind_with_the_servers_message(
    args: tuple[Any, ...], kwargs: dict[str, Any], kind: type[KVCacheError], message: str
) -> None:
    async def main() -> None:
        async with fed() as setup, serving(setup.queries) as target:
            for method in ("locality", "score", "candidates"):
                for error in await both_fail(target, method, *args, **kwargs):
                    assert type(error) is kind
                    assert error.code == CODES[kind]
                    assert message in error.message and str(error) == error.message

    asyncio.run(main())


def test_backend_unavailable_is_service_unavailable_and_a_bug_is_the_base_error() -> None:
    async def main() -> None:
        down = FailingIndex(Unavailable("index backend unreachable"))
        async with fed("python", index=down) as setup, serving(setup.queries) as target:
            for error in await both_fail(target, "score", MODEL, TOKENS):
                assert isinstance(error, ServiceUnavailable)
                assert (error.code, error.message) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "index backend unreachable",
                )
        broken = FailingIndex(RuntimeError("redis://admin:hunter2@10.0.0.1 refused"))
        async with fed("python", index=broken) as setup, serving(setup.queries) as target:
            for error in await both_fail(target, "locality", MODEL, TOKENS):
                assert type(error) is KVCacheError
                assert error.code == grpc.StatusCode.INTERNAL
                assert error.message.startswith("internal error")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_ids": [1, -1]}, "token_ids[1] = -1 is not an int in [0, 2**32)"),
        ({"token_ids": [2**32]}, "token_ids[0] = 4294967296 is not an int"),
        ({"token_ids": "abc"}, "token_ids: expected a sequence, got str"),
        ({"block_hashes": [2**64]}, "block_hashes: Value out of range"),
        ({"token_ids": TOKENS, "pods": A}, "pods: expected a sequence, got str"),
        ({"token_ids": TOKENS, "lora_name": 7}, "lora_name: "),
        ({"messages": [{"role": "user"}]}, "(missing 'content')"),
    ],
)
def test_values_protobuf_cannot_encode_are_invalid_before_sending(
    kwargs: dict[str, Any], message: str
) -> None:
    # Nothing listens on the port: had the request been sent, this would be UNAVAILABLE.
    target = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        for error in await both_fail(target, "locality", MODEL, **kwargs):
            assert type(error) is InvalidRequest
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert message in error.message

    asyncio.run(main())


def test_errors_survive_pickling() -> None:
    error = ServiceUnavailable("index backend unreachable", grpc.StatusCode.DEADLINE_EXCEEDED)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.message, copy.code) == (
        ServiceUnavailable,
        error.message,
        error.code,
    )


# -- timeouts, metadata -----------------------------------------------------------------------


def test_nothing_listening_is_service_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        for error in await both_fail(target, "score", MODEL, TOKENS):
            assert isinstance(error, ServiceUnavailable)
            assert error.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


class SlowIndex(ReferenceIndex):
    """A reference index that takes ``delay`` seconds per lookup, as an overloaded backend
    (Python plane)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        await asyncio.sleep(self.delay)
        return await super().lookup(model, keys, pods)


def test_a_slow_server_is_service_unavailable_after_the_timeout() -> None:
    async def main() -> None:
        async with fed("python", index=SlowIndex(0.2)) as setup, serving(setup.queries) as target:
            # The default (50 ms) gives up; a per-call timeout waits; either way round.
            with KVCacheClient(target) as sync:
                with pytest.raises(ServiceUnavailable) as caught:
                    await asyncio.to_thread(sync.score, MODEL, TOKENS)
                assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                slow = await asyncio.to_thread(sync.score, MODEL, TOKENS, timeout=PATIENT)
                assert slow == pytest.approx({A: 0.9, f"{B}@dp1": 0.5})
            async with AsyncKVCacheClient(target, timeout=PATIENT) as client:
                assert await client.score(MODEL, TOKENS) == slow
                with pytest.raises(ServiceUnavailable) as caught:
                    await client.score(MODEL, TOKENS, timeout=0.05)
                assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(main())


class Recorder:
    """A KVCacheService with only ListModels, answering nothing and noting each call's
    deadline and ``x-`` metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, dict[str, str | bytes]]] = []

    async def list_models(
        self,
        request: kvcache_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> kvcache_pb2.ListModelsResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if k.startswith("x-")}
        self.calls.append((context.time_remaining(), metadata))
        return kvcache_pb2.ListModelsResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        list_models = grpc.unary_unary_rpc_method_handler(
            self.list_models,
            request_deserializer=kvcache_pb2.ListModelsRequest.FromString,
            response_serializer=kvcache_pb2.ListModelsResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            "kvcache.v1.KVCacheService", {"ListModels": list_models}
        )


def test_timeout_and_metadata_reach_the_server() -> None:
    async def main() -> None:
        recorder = Recorder()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([recorder.handler()])
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            tenant = [("x-tenant", "t1")]
            with KVCacheClient(target, timeout=2.0, metadata=tenant) as sync:
                await asyncio.to_thread(sync.models)
                await asyncio.to_thread(sync.models, timeout=4.0, metadata=[("x-id", "r1")])
            async with AsyncKVCacheClient(target, timeout=2.0, metadata=tenant) as client:
                await client.models()
                await client.models(timeout=4.0, metadata=[("x-id", "r2")])
            async with AsyncKVCacheClient(target, timeout=None) as unbounded:
                await unbounded.models()
        finally:
            await server.stop(None)
        deadlines = [remaining for remaining, _ in recorder.calls]
        # The wire rounds a deadline up a little (grpc-timeout has coarse units).
        for default, per_call in (deadlines[0:2], deadlines[2:4]):
            assert default is not None and 1.0 < default < 2.1
            assert per_call is not None and 3.0 < per_call < 4.1
        assert deadlines[4] is None
        assert [metadata for _, metadata in recorder.calls] == [
            {"x-tenant": "t1"},
            {"x-tenant": "t1", "x-id": "r1"},
            {"x-tenant": "t1"},
            {"x-tenant": "t1", "x-id": "r2"},
            {},
        ]

    asyncio.run(main())


# -- channel ownership ----------------------------------------------------------------------


def stub_score(channel: grpc.Channel) -> dict[str, float]:
    """Score over ``channel`` with the generated stub: raises if the channel is closed."""
    request = kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS)
    stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
    return dict(stub.Score(request, timeout=PATIENT).scores)


def test_sync_client_closes_the_channel_it_opened_only(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[grpc.Channel] = []
    open_channel = grpc.insecure_channel

    def recording(target: str) -> grpc.Channel:
        opened.append(open_channel(target))
        return opened[-1]

    def scenario(target: str) -> None:
        monkeypatch.setattr(grpc, "insecure_channel", recording)
        with KVCacheClient(target, timeout=PATIENT) as client:
            client.models()
        (own,) = opened
        with pytest.raises(ValueError, match="closed channel"):
            stub_score(own)
        with pytest.raises(RuntimeError, match="closed"):
            client.models()

        with open_channel(target) as theirs:
            with KVCacheClient(theirs, timeout=PATIENT) as client:
                client.models()
            assert len(stub_score(theirs)) == 2
            with pytest.raises(RuntimeError, match="closed"):
                client.models()

    async def main() -> None:
        async with fed() as setup, serving(setup.queries) as target:
            await asyncio.to_thread(scenario, target)

    asyncio.run(main())


def test_async_client_built_before_the_loop_opens_and_closes_its_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A grpc.aio channel belongs to the loop it is opened in; plugins are built before it.
    port = free_port()
    client = AsyncKVCacheClient(f"127.0.0.1:{port}", timeout=PATIENT)
    opened: list[grpc.aio.Channel] = []
    open_channel = grpc.aio.insecure_channel

    def recording(target: str) -> grpc.aio.Channel:
        opened.append(open_channel(target))
        return opened[-1]

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording)

    async def main() -> None:
        async with fed() as setup, serving(setup.queries, port) as target:
            async with client:
                assert len(await client.score(MODEL, TOKENS)) == 2
            (own,) = opened
            assert own.get_state() == grpc.ChannelConnectivity.SHUTDOWN
            with pytest.raises(RuntimeError, match="closed"):
                await client.models()

            async with open_channel(target) as theirs:
                async with AsyncKVCacheClient(theirs, timeout=PATIENT) as borrowed:
                    await borrowed.models()
                assert theirs.get_state() != grpc.ChannelConnectivity.SHUTDOWN
                stub = kvcache_pb2_grpc.KVCacheServiceStub(theirs)
                request = kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS)
                assert len((await stub.Score(request, timeout=PATIENT)).scores) == 2
                with pytest.raises(RuntimeError, match="closed"):
                    await borrowed.models()

    asyncio.run(main())
