"""The gRPC edge, end to end in one process: a real grpc.aio server and client over a real
QueryService and data plane fed vLLM wire bytes (tests/support/planes.py).

Every test that checks an answer runs against both data planes (``kind``: native and the
Python reference). pytest-asyncio is not a dependency: each test runs its coroutine with
``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from service.api.generated.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.api.grpc_server import GrpcApi, start_grpc_server
from service.api.query import LocalityAnswer, LocalityQuery, QueryService
from service.dataplane.protocol import DataPlaneKind
from service.errors import Unavailable
from service.index.protocol import BlockIndex, PodMatch, PodRank
from service.index.reference import ReferenceIndex
from service.readiness import ServiceStatus
from service.status import ModelStatus, PodStatus, Readiness, StatusSource
from tests.support.planes import Feeder, make_plane
from tests.support.vllm_wire import removed, stored

if TYPE_CHECKING:
    from service.api.generated.indexer.v1.indexer_pb2_grpc import IndexerServiceAsyncStub
    from service.api.generated.kvcache.v1.kvcache_pb2_grpc import KVCacheServiceAsyncStub

MODEL = "m"
A, B, C = "10.0.0.7:8000", "10.0.0.8:8000", "10.0.0.9:8000"
TOKENS = list(range(1000, 1064))  # four blocks of 16
HASHES = [0xABCDEF0000000000 + i for i in range(1, 5)]
MAX_TOKENS = 1024
MAX_MESSAGE_BYTES = 64 * 1024
SERVICES = ("kvcache.v1.KVCacheService", "indexer.v1.IndexerService")


@dataclass
class Status:
    """A StatusSource whose readiness a test can flip."""

    ready: bool = True
    pod_list: list[PodStatus] = field(default_factory=list)
    model_list: list[ModelStatus] = field(default_factory=list)

    async def pods(self) -> list[PodStatus]:
        return self.pod_list

    async def models(self) -> list[ModelStatus]:
        return self.model_list

    async def readiness(self) -> Readiness:
        return Readiness(self.ready, () if self.ready else ("starting",))


@dataclass
class Fed:
    """A QueryService over a data plane fed by ``feeder``, and that plane's status."""

    queries: QueryService
    feeder: Feeder
    status: ServiceStatus


@asynccontextmanager
async def fed(
    kind: DataPlaneKind = "native",
    *,
    index: BlockIndex | None = None,
    status: StatusSource | None = None,
    service: type[QueryService] = QueryService,
    max_tokens: int = MAX_TOKENS,
) -> AsyncIterator[Fed]:
    """A plane where pod A holds all four blocks of TOKENS, the last two moved from GPU to
    CPU (score 0.9), and pod B's rank 1 the first two on GPU (score 0.5); stopped after.

    ``status`` replaces the plane's own (a ``ServiceStatus``, started)."""
    plane = make_plane(kind, index=index)
    try:
        feeder = Feeder(plane, MODEL)
        await feeder.send(A, stored(HASHES, TOKENS))
        await feeder.send(A, stored(HASHES[2:], medium="CPU"), removed(HASHES[2:]))
        await feeder.send(B, stored(HASHES[:2], TOKENS[:32]), rank=1)
        own = ServiceStatus(plane)
        own.started = True
        queries = service(plane, max_tokens=max_tokens, status=status or own)
        yield Fed(queries, feeder, own)
    finally:
        await plane.stop()


@asynccontextmanager
async def serving(queries: QueryService) -> AsyncIterator[tuple[GrpcApi, grpc.aio.Channel]]:
    api = GrpcApi(queries, max_message_bytes=MAX_MESSAGE_BYTES)
    port = await api.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield api, channel
    finally:
        await api.stop(None)


def run_kvcache(
    test: Callable[[KVCacheServiceAsyncStub], Awaitable[None]], kind: DataPlaneKind = "native"
) -> None:
    """Runs ``test`` against a server over the fed plane."""

    async def main() -> None:
        async with fed(kind) as setup, serving(setup.queries) as (_, channel):
            await test(kvcache_pb2_grpc.KVCacheServiceStub(channel))

    asyncio.run(main())


async def failure(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


def query(**fields: object) -> kvcache_pb2.LocalityRequest:
    return kvcache_pb2.LocalityRequest(model=MODEL, **fields)  # type: ignore[arg-type]


def pods_of(response: kvcache_pb2.LocalityResponse) -> list[tuple[str, int, int, int, int]]:
    return [
        (p.pod_id, p.dp_rank, p.match_length, p.matched_tokens, p.block_count)
        for p in response.pods
    ]


# -- answers --------------------------------------------------------------------------------


def test_locality_answers_every_field(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        # A trailing partial block is not a block.
        response = await stub.Locality(query(token_ids=[*TOKENS, 1, 2, 3]))
        assert response.model == MODEL
        assert response.HasField("block_size") and response.block_size == 16
        assert (response.total_blocks, response.cache_hits) == (4, 4)
        assert response.coverage == 1.0
        assert pods_of(response) == [(A, 0, 4, 64, 4), (B, 1, 2, 32, 2)]
        assert [dict(p.tiers) for p in response.pods] == [{"gpu": 2, "cpu": 2}, {"gpu": 2}]
        assert [p.score for p in response.pods] == pytest.approx([(2 + 2 * 0.8) / 4, 0.5])

    run_kvcache(test, kind)


def test_packed_token_ids_answer_as_the_list_does(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        tokens = [*TOKENS, 1, 2, 3]
        packed = b"".join(t.to_bytes(4, "little") for t in tokens)
        for rpc in (stub.Locality, stub.Score, stub.GetCandidates):
            assert await rpc(query(token_ids_packed=packed)) == await rpc(query(token_ids=tokens))
        response = await stub.Locality(query(token_ids_packed=packed, lora_name="sql-adapter"))
        assert (response.total_blocks, len(response.pods)) == (4, 0)

    run_kvcache(test, kind)


def test_block_hashes_resolve_through_the_hashes_seen_in_events(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        response = await stub.Locality(query(block_hashes=HASHES[:2]))
        assert (response.total_blocks, response.cache_hits) == (2, 2)
        assert pods_of(response) == [(A, 0, 2, 32, 2), (B, 1, 2, 32, 2)]

    run_kvcache(test, kind)


def test_lora_name_and_cache_salt_reach_the_keys(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        for request in (
            query(token_ids=TOKENS, lora_name="sql-adapter"),
            query(token_ids=TOKENS, cache_salt="tenant-1"),
        ):
            response = await stub.Locality(request)
            assert (response.total_blocks, len(response.pods)) == (4, 0)

    run_kvcache(test, kind)


def test_candidates_filter_answers_every_candidate_unmatched_ones_with_zero(
    kind: DataPlaneKind,
) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        # A bare pod id stands for every rank that holds something.
        response = await stub.Locality(query(token_ids=TOKENS, pods=[C, B]))
        assert pods_of(response) == [(B, 1, 2, 32, 2), (C, 0, 0, 0, 0)]
        assert [p.score for p in response.pods] == [0.5, 0.0]
        assert dict(response.pods[1].tiers) == {}
        assert (response.cache_hits, response.coverage) == (2, 0.5)
        ranked = await stub.Locality(query(token_ids=TOKENS, pods=[f"{B}@dp0"]))
        assert pods_of(ranked) == [(B, 0, 0, 0, 0)]

    run_kvcache(test, kind)


def test_score_is_keyed_by_pod_label(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        response = await stub.Score(query(token_ids=TOKENS))
        assert response.model == MODEL
        assert dict(response.scores) == pytest.approx({A: 0.9, f"{B}@dp1": 0.5})

    run_kvcache(test, kind)


def test_get_candidates_ranks_best_first(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        every = await stub.GetCandidates(query(token_ids=TOKENS))
        assert (every.model, every.total_blocks) == (MODEL, 4)
        assert [(c.pod, c.match_length) for c in every.candidates] == [(A, 4), (f"{B}@dp1", 2)]
        assert [c.score for c in every.candidates] == pytest.approx([0.9, 0.5])
        some = await stub.GetCandidates(query(token_ids=TOKENS, pods=[C, A]))
        assert [(c.pod, c.match_length) for c in some.candidates] == [(A, 4), (C, 0)]
        assert some.candidates[1].score == 0.0

    run_kvcache(test, kind)


def test_unknown_model_answers_no_pods(kind: DataPlaneKind) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        response = await stub.Locality(
            kvcache_pb2.LocalityRequest(model="never-seen", token_ids=TOKENS)
        )
        assert response.model == "never-seen"
        assert not response.HasField("block_size")
        assert (response.total_blocks, len(response.pods)) == (0, 0)

    run_kvcache(test, kind)


def test_list_pods_and_models_answer_what_the_plane_tracks(kind: DataPlaneKind) -> None:
    async def main() -> None:
        async with fed(kind) as setup, serving(setup.queries) as (_, channel):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
            pods = (await stub.ListPods(kvcache_pb2.ListPodsRequest())).pods
            models = (await stub.ListModels(kvcache_pb2.ListModelsRequest())).models
        assert [(p.pod_id, p.dp_rank, p.model, p.blocks, p.state) for p in pods] == [
            (A, 0, MODEL, 4, "live"),
            (B, 1, MODEL, 2, "live"),
        ]
        assert [(p.batches, p.last_seq, p.gaps, p.lost_batches, p.replays) for p in pods] == [
            (2, 1, 0, 0, 0),
            (1, 0, 0, 0, 0),
        ]
        assert all(p.HasField("last_event_time") for p in pods)
        ((name, key_mode, block_size, blocks, pod_count),) = [
            (m.name, m.key_mode, m.block_size, m.blocks, m.pods) for m in models
        ]
        assert (name, key_mode, block_size, blocks, pod_count) == (MODEL, "tokens", 16, 6, 2)

    asyncio.run(main())


def test_list_pods_and_models_leave_unknowns_unset() -> None:
    pod = PodStatus(A, 1, None, 7, "replaying", None, None, 3, 1, 2, 1, 0)
    model = ModelStatus(MODEL, "tokens", False, None, 7, 1, 0, 0)

    async def main() -> None:
        status = Status(pod_list=[pod], model_list=[model])
        async with fed(status=status) as setup, serving(setup.queries) as (_, channel):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
            (listed,) = (await stub.ListPods(kvcache_pb2.ListPodsRequest())).pods
            (model_listed,) = (await stub.ListModels(kvcache_pb2.ListModelsRequest())).models
        assert (listed.pod_id, listed.dp_rank, listed.blocks, listed.state) == (
            A,
            1,
            7,
            "replaying",
        )
        assert (listed.batches, listed.gaps, listed.lost_batches, listed.replays) == (3, 1, 2, 1)
        for unset in ("model", "last_event_time", "last_seq"):
            assert not listed.HasField(unset)
        assert (model_listed.name, model_listed.key_mode, model_listed.blocks) == (
            MODEL,
            "tokens",
            7,
        )
        assert not model_listed.configured and not model_listed.HasField("block_size")

    asyncio.run(main())


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (kvcache_pb2.LocalityRequest(model=MODEL), "give exactly one of token_ids"),
        # An empty repeated field is indistinguishable from an absent one.
        (kvcache_pb2.LocalityRequest(model=MODEL, token_ids=[]), "give exactly one of"),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS, prompt="hi"),
            "(got token_ids, prompt)",
        ),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, block_hashes=HASHES, prompt=""),
            "(got block_hashes, prompt)",
        ),
        (kvcache_pb2.LocalityRequest(token_ids=TOKENS), "model is required"),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids=TOKENS, pods=[A, ""]),
            "pods: '' is not a pod id",
        ),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids_packed=b"\x01\x00\x00"),
            "token_ids_packed: 3 bytes is not a whole number of token ids",
        ),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids=[1], token_ids_packed=bytes(4)),
            "give token_ids or token_ids_packed, not both",
        ),
        (
            kvcache_pb2.LocalityRequest(model=MODEL, token_ids_packed=bytes(4), prompt="hi"),
            "(got token_ids, prompt)",
        ),
    ],
)
def test_bad_input_is_invalid_argument_saying_what_is_wrong(
    request_: kvcache_pb2.LocalityRequest, message: str
) -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        for rpc in (stub.Locality, stub.Score, stub.GetCandidates):
            code, details = await failure(rpc(request_))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert message in details

    run_kvcache(test)


def test_too_many_tokens_is_resource_exhausted() -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        code, details = await failure(stub.Locality(query(token_ids=[1] * (MAX_TOKENS + 1))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == f"{MAX_TOKENS + 1} token ids exceed api.max_tokens ({MAX_TOKENS})"

    run_kvcache(test)


def test_oversized_message_is_resource_exhausted_and_the_server_carries_on() -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        # 5 bytes per token id: over max_message_bytes before max_tokens is even looked at.
        big = query(token_ids=[2**31] * (MAX_MESSAGE_BYTES // 5 + 1))
        code, _ = await failure(stub.Locality(big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len((await stub.Locality(query(token_ids=TOKENS))).pods) == 2

    run_kvcache(test)


def test_text_prompts_are_failed_precondition_naming_the_tokenizer() -> None:
    async def test(stub: KVCacheServiceAsyncStub) -> None:
        chat = [kvcache_pb2.ChatMessage(role="user", content="hi")]
        for request in (query(prompt="hello"), query(messages=chat)):
            code, details = await failure(stub.Locality(request))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "no tokenizer configured (models[].tokenizer)" in details

    run_kvcache(test)


class FailingIndex(ReferenceIndex):
    """A reference index whose lookups fail, as a broken backend's would (Python plane)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def lookup(
        self, model: str, keys: Sequence[int], pods: Collection[PodRank] | None = None
    ) -> list[PodMatch]:
        raise self.error


def test_unexpected_errors_are_internal_without_their_text() -> None:
    async def main() -> None:
        index = FailingIndex(RuntimeError("redis://admin:hunter2@10.0.0.1 refused"))
        async with fed("python", index=index) as setup, serving(setup.queries) as (_, channel):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
            code, details = await failure(stub.Score(query(token_ids=TOKENS)))
        assert code == grpc.StatusCode.INTERNAL
        assert "hunter2" not in details and "redis" not in details

    asyncio.run(main())


def test_backend_unavailable_is_unavailable() -> None:
    async def main() -> None:
        index = FailingIndex(Unavailable("index backend unreachable"))
        async with fed("python", index=index) as setup, serving(setup.queries) as (_, channel):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
            code, details = await failure(stub.Locality(query(token_ids=TOKENS)))
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "index backend unreachable")

    asyncio.run(main())


# -- llm-d's IndexerService -----------------------------------------------------------------


def run_indexer(test: Callable[[IndexerServiceAsyncStub], Awaitable[None]]) -> None:
    async def main() -> None:
        async with fed() as setup, serving(setup.queries) as (_, channel):
            await test(indexer_pb2_grpc.IndexerServiceStub(channel))

    asyncio.run(main())


def test_get_pod_scores_needs_a_tokenizer() -> None:
    async def test(stub: IndexerServiceAsyncStub) -> None:
        request = indexer_pb2.GetPodScoresRequest(prompt="hello", model_name=MODEL)
        code, details = await failure(stub.GetPodScores(request))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"model {MODEL!r} has no tokenizer configured" in details
        code, details = await failure(stub.GetPodScores(indexer_pb2.GetPodScoresRequest()))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "model is required")

    run_indexer(test)


class SpaceTokenizer(QueryService):
    """Reads a prompt as space-separated token ids: a stand-in until text prompts land."""

    async def locality(self, query: LocalityQuery, *, api: str = "internal") -> LocalityAnswer:
        if query.prompt is not None:
            tokens = [int(t) for t in query.prompt.split()]
            query = LocalityQuery(model=query.model, token_ids=tokens, pods=query.pods)
        return await super().locality(query, api=api)


def test_get_pod_scores_splits_the_rank_from_the_pod_id_as_llm_d_does(
    kind: DataPlaneKind,
) -> None:
    async def test(stub: IndexerServiceAsyncStub) -> None:
        prompt = " ".join(map(str, TOKENS))
        every = await stub.GetPodScores(
            indexer_pb2.GetPodScoresRequest(prompt=prompt, model_name=MODEL)
        )
        assert [(s.pod, s.score) for s in every.scores] == [(A, pytest.approx(0.9)), (B, 0.5)]
        assert not every.scores[0].HasField("data_parallel_rank")
        assert every.scores[1].data_parallel_rank == 1
        some = await stub.GetPodScores(
            indexer_pb2.GetPodScoresRequest(prompt=prompt, model_name=MODEL, pod_identifiers=[C])
        )
        assert [(s.pod, s.score) for s in some.scores] == [(C, 0.0)]

    async def main() -> None:
        async with (
            fed(kind, service=SpaceTokenizer, max_tokens=99) as setup,
            serving(setup.queries) as (_, channel),
        ):
            await test(indexer_pb2_grpc.IndexerServiceStub(channel))

    asyncio.run(main())


# -- health, reflection, lifecycle ----------------------------------------------------------


# typeshed's HealthStub and ServerReflectionStub declare no typed methods: call by path.


def health_check(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[
    health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
]:
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def test_health_follows_readiness(kind: DataPlaneKind) -> None:
    async def main() -> None:
        async with fed(kind) as setup, serving(setup.queries) as (api, channel):
            status = setup.status
            check = health_check(channel)
            requests = [health_pb2.HealthCheckRequest(service=s) for s in ("", *SERVICES)]

            async def statuses() -> list[int]:
                assert await api.refresh_health() == (status.started and not status.stopping)
                return [(await check(r)).status for r in requests]

            serving_, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            status.started = False  # starting up
            assert await statuses() == [not_serving] * 3
            status.started = True
            assert await statuses() == [serving_] * 3
            status.stopping = True  # shutting down
            assert await statuses() == [not_serving] * 3
            unknown = check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
            assert (await failure(unknown))[0] == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_reflection_lists_and_describes_the_services() -> None:
    async def main() -> None:
        async with fed() as setup, serving(setup.queries) as (_, channel):
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[0]),
            ]
            listed, described = [r async for r in reflect(iter(requests))]
        names = {s.name for s in listed.list_services_response.service}
        assert names >= {
            *SERVICES,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert described.file_descriptor_response.file_descriptor_proto

    asyncio.run(main())


def test_start_grpc_server_binds_a_free_port_and_a_taken_one_fails() -> None:
    async def main() -> None:
        async with fed() as setup:
            await serve_and_take_the_port(setup.queries)

    async def serve_and_take_the_port(queries: QueryService) -> None:
        server, port = await start_grpc_server(queries, "127.0.0.1", 0)
        try:
            assert port > 0
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
                assert len((await stub.Locality(query(token_ids=TOKENS))).pods) == 2
            second = GrpcApi(queries)
            with pytest.raises(OSError, match="cannot bind gRPC"):
                await second.start("127.0.0.1", port)
            await second.stop(None)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_api_built_outside_the_event_loop_serves_inside_it(kind: DataPlaneKind) -> None:
    # The composition root builds its parts (the data plane too) before asyncio.run;
    # grpc.aio binds to a loop.
    plane = make_plane(kind)
    api = GrpcApi(QueryService(plane, max_tokens=MAX_TOKENS))

    async def main() -> None:
        try:
            feeder = Feeder(plane, MODEL)
            await feeder.send(A, stored(HASHES[:1], TOKENS[:16]))
            port = await api.start("127.0.0.1", 0)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
                    response = await stub.Locality(query(token_ids=TOKENS[:10]))
                    assert (response.total_blocks, len(response.pods)) == (0, 0)
                    response = await stub.Locality(query(token_ids=TOKENS[:16]))
                    assert pods_of(response) == [(A, 0, 1, 16, 1)]
            finally:
                await api.stop(None)
        finally:
            await plane.stop()

    asyncio.run(main())
