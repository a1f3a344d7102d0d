"""Text prompts and chats over REST and gRPC score the same pods as their token ids.

A data plane (each test runs against both) is fed vLLM events carrying the token ids of the
prompt and of the rendered chat, computed here with the plain ``tokenizers`` tokenizer (not
the service's code path), as an engine would have; queries then give the text and must get
the answer the ids get.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import prometheus_client
import pytest
from google.protobuf.struct_pb2 import Struct
from tokenizers import Tokenizer

from service.api.generated.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.api.grpc_server import GrpcApi
from service.api.query import LocalityQuery, QueryService
from service.api.rest import create_rest_app
from service.dataplane.protocol import DataPlaneKind
from service.errors import QueryTooLarge
from service.prompts import PromptEncoders
from tests.support.planes import Feeder, make_plane
from tests.support.vllm_wire import stored
from tests.unit.prompts.build import BOS, CORPUS, write_model

MODEL = "m"
BLOCK = 16
A, B, C = "10.0.0.7:8000", "10.0.0.8:8000", "10.0.0.9:8000"
PROMPT = " ".join(CORPUS)
SYSTEM = "You are a helpful assistant. " * 6
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "text", "text": "Where do"}, "foxes sleep?"]},
]
RENDERED = (
    f"{BOS}<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    "<|im_start|>user\nWhere do\nfoxes sleep?<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass
class Setup:
    """A QueryService over an index holding the prompt's and the chat's blocks."""

    queries: QueryService
    prompt_ids: list[int]
    chat_ids: list[int]


def full_blocks(ids: list[int]) -> list[int]:
    return ids[: len(ids) - len(ids) % BLOCK]


async def feed(feeder: Feeder, pod: str, tokens: list[int], first: int) -> None:
    hashes = [first + i for i in range(len(tokens) // BLOCK)]
    await feeder.send(pod, stored(hashes, tokens))


@asynccontextmanager
async def build(
    directory: Path, kind: DataPlaneKind, *, max_tokens: int = 4096
) -> AsyncIterator[Setup]:
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt_ids = reference.encode(PROMPT).ids  # /v1/completions: BOS added
    chat_ids = reference.encode(RENDERED, add_special_tokens=False).ids  # the template has it
    plane = make_plane(kind)
    try:
        feeder = Feeder(plane, MODEL)
        await feed(feeder, A, full_blocks(prompt_ids), 1_000)
        await feed(feeder, B, full_blocks(prompt_ids)[: 2 * BLOCK], 1_000)
        await feed(feeder, C, full_blocks(chat_ids), 2_000)
        environ = {"HF_HUB_CACHE": str(directory.parent / "hub")}
        prompts = PromptEncoders(
            [_Spec(MODEL, str(directory))], environ=environ, default_store_bytes=1 << 20
        )
        queries = QueryService(plane, max_tokens=max_tokens, prompts=prompts)
        yield Setup(queries, prompt_ids, chat_ids)
    finally:
        await plane.stop()


@dataclass(frozen=True)
class _Spec:
    name: str
    tokenizer: str | None
    chat_template: str | None = None
    prefix_store_bytes: int = 1 << 20


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


# -- REST ---------------------------------------------------------------------------------


def rest(
    directory: Path,
    kind: DataPlaneKind,
    scenario: Callable[[httpx.AsyncClient, Setup], Awaitable[None]],
) -> None:
    async def main() -> None:
        async with build(directory, kind) as setup:
            app = create_rest_app(
                setup.queries, prometheus_client.CollectorRegistry(), max_body_bytes=1 << 20
            )
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kv-cache") as http:
                await scenario(http, setup)

    asyncio.run(main())


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await http.post(path, json={"model": MODEL, **body})
    return response.status_code, response.json()


def test_rest_text_and_chat_answer_as_their_token_ids(model_dir: Path, kind: DataPlaneKind) -> None:
    async def scenario(http: httpx.AsyncClient, setup: Setup) -> None:
        for path in ("/v1/locality", "/v1/score"):
            by_ids = await post(http, path, {"token_ids": setup.prompt_ids})
            assert await post(http, path, {"prompt": PROMPT}) == by_ids
            chat_by_ids = await post(http, path, {"token_ids": setup.chat_ids})
            assert await post(http, path, {"messages": MESSAGES}) == chat_by_ids
        _, answer = await post(http, "/v1/locality", {"prompt": PROMPT})
        assert [p["pod_id"] for p in answer["pods"]] == [A, B]
        assert answer["pods"][0]["match_length"] == len(setup.prompt_ids) // BLOCK
        _, chat = await post(http, "/v1/locality", {"messages": MESSAGES})
        assert [(p["pod_id"], p["score"]) for p in chat["pods"]] == [(C, 1.0)]

    rest(model_dir, kind, scenario)


def test_rest_lora_name_and_cache_salt_still_apply_to_text(
    model_dir: Path, kind: DataPlaneKind
) -> None:
    async def scenario(http: httpx.AsyncClient, setup: Setup) -> None:
        for extra in ({"lora_name": "adapter"}, {"cache_salt": "tenant"}):
            by_ids = await post(http, "/v1/locality", {"token_ids": setup.prompt_ids, **extra})
            assert await post(http, "/v1/locality", {"prompt": PROMPT, **extra}) == by_ids
            assert by_ids[1]["pods"] == []  # the engines stored these blocks without either

    rest(model_dir, kind, scenario)


def test_rest_bad_text_queries_say_what_is_wrong(model_dir: Path) -> None:
    async def scenario(http: httpx.AsyncClient, setup: Setup) -> None:
        status, body = await post(http, "/v1/locality", {"prompt": "hi", "model": "org/other"})
        assert status == 422
        assert "model 'org/other' has no tokenizer configured" in body["detail"]
        assert "models--org--other/snapshots/*/tokenizer.json" in body["detail"]
        robot = [{"role": "robot", "content": "beep"}]
        status, body = await post(http, "/v1/locality", {"messages": robot})
        assert (status, body["detail"]) == (422, "chat template of model 'm': Unknown role: robot")
        status, body = await post(http, "/v1/locality", {"messages": [{"content": "no role"}]})
        assert (status, body["detail"]) == (400, "messages[0].role must be a non-empty string")
        status, body = await post(http, "/v1/locality", {"messages": "not a list"})
        assert status == 422 and body["detail"].startswith("messages:")
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]
        status, body = await post(http, "/v1/locality", {"messages": image})
        assert status == 422 and "'image_url' is not supported" in body["detail"]
        # The index and the service carry on.
        assert (await post(http, "/v1/locality", {"prompt": PROMPT}))[0] == 200

    rest(model_dir, "native", scenario)


def test_a_prompt_over_max_tokens_is_too_large(model_dir: Path) -> None:
    async def main() -> None:
        async with build(model_dir, "native", max_tokens=32) as setup:
            with pytest.raises(QueryTooLarge, match=r"tokens in the prompt exceed api\.max_tokens"):
                await setup.queries.locality(LocalityQuery(model=MODEL, prompt=PROMPT))

    asyncio.run(main())


# -- gRPC ---------------------------------------------------------------------------------


@asynccontextmanager
async def channel(
    directory: Path, kind: DataPlaneKind
) -> AsyncIterator[tuple[grpc.aio.Channel, Setup]]:
    async with build(directory, kind) as setup:
        api = GrpcApi(setup.queries)
        port = await api.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
                yield opened, setup
        finally:
            await api.stop(None)


def grpc_messages() -> list[kvcache_pb2.ChatMessage]:
    system, user = MESSAGES
    parts = user["content"]
    assert isinstance(parts, list)
    text = "\n".join(p["text"] if isinstance(p, dict) else p for p in parts)
    return [
        kvcache_pb2.ChatMessage(role="system", content=str(system["content"])),
        kvcache_pb2.ChatMessage(role="user", content=text),
    ]


def test_grpc_text_and_chat_answer_as_their_token_ids(model_dir: Path, kind: DataPlaneKind) -> None:
    async def main() -> None:
        async with channel(model_dir, kind) as (opened, setup):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(opened)

            def request(**fields: Any) -> kvcache_pb2.LocalityRequest:
                return kvcache_pb2.LocalityRequest(model=MODEL, **fields)

            by_ids = await stub.Locality(request(token_ids=setup.prompt_ids))
            assert await stub.Locality(request(prompt=PROMPT)) == by_ids
            assert [p.pod_id for p in by_ids.pods] == [A, B]
            chat_by_ids = await stub.Score(request(token_ids=setup.chat_ids))
            assert await stub.Score(request(messages=grpc_messages())) == chat_by_ids
            assert dict(chat_by_ids.scores) == {C: 1.0}

    asyncio.run(main())


def test_grpc_indexer_get_pod_scores_answers_for_prompt_text(
    model_dir: Path, kind: DataPlaneKind
) -> None:
    async def main() -> None:
        async with channel(model_dir, kind) as (opened, setup):
            stub = indexer_pb2_grpc.IndexerServiceStub(opened)
            scores = await stub.GetPodScores(
                indexer_pb2.GetPodScoresRequest(prompt=PROMPT, model_name=MODEL)
            )
            by_ids = await setup.queries.locality(
                LocalityQuery(model=MODEL, token_ids=setup.prompt_ids)
            )
            expected = by_ids.locality.pods
            assert [s.pod for s in scores.scores] == [p.pod.pod_id for p in expected] == [A, B]
            assert [s.score for s in scores.scores] == pytest.approx([p.score for p in expected])

    asyncio.run(main())


def test_grpc_bad_text_queries_get_status_codes_with_the_reason(model_dir: Path) -> None:
    async def main() -> None:
        async with channel(model_dir, "native") as (opened, _):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(opened)
            cases = [
                (
                    kvcache_pb2.LocalityRequest(model="org/other", prompt="hi"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "models--org--other/snapshots/*/tokenizer.json",
                ),
                (
                    kvcache_pb2.LocalityRequest(
                        model=MODEL, messages=[kvcache_pb2.ChatMessage(role="robot")]
                    ),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "chat template of model 'm': Unknown role: robot",
                ),
                (
                    kvcache_pb2.LocalityRequest(
                        model=MODEL, messages=[kvcache_pb2.ChatMessage(content="x")]
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "messages[0].role must be a non-empty string",
                ),
            ]
            for request, code, detail in cases:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Locality(request)
                assert caught.value.code() == code
                assert detail in (caught.value.details() or "")

    asyncio.run(main())


TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def test_tools_reach_the_chat_template_over_rest_and_grpc(
    model_dir: Path, kind: DataPlaneKind
) -> None:
    # The template renders tools first, so the chat with tools is another prompt: pod C,
    # which holds the chat rendered without tools, no longer holds its whole prefix.
    async def scenario(http: httpx.AsyncClient, setup: Setup) -> None:
        _, plain = await post(http, "/v1/score", {"messages": MESSAGES})
        _, with_tools = await post(http, "/v1/score", {"messages": MESSAGES, "tools": [TOOL]})
        assert plain["scores"] == {C: 1.0}
        assert with_tools["scores"].get(C, 0.0) < 1.0

    rest(model_dir, kind, scenario)

    async def main() -> None:
        async with channel(model_dir, kind) as (opened, _):
            stub = kvcache_pb2_grpc.KVCacheServiceStub(opened)
            tool = Struct()
            tool.update(TOOL)
            plain = await stub.Score(
                kvcache_pb2.LocalityRequest(model=MODEL, messages=grpc_messages())
            )
            with_tools = await stub.Score(
                kvcache_pb2.LocalityRequest(model=MODEL, messages=grpc_messages(), tools=[tool])
            )
            assert dict(plain.scores) == {C: 1.0}
            assert dict(with_tools.scores).get(C, 0.0) < 1.0

    asyncio.run(main())
