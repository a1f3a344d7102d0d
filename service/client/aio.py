"""``AsyncKVCacheClient``: the asyncio client, over a ``grpc.aio.Channel``."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc

from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.client._wire import (
    DEFAULT_TIMEOUT,
    CallMetadata,
    ChatMessages,
    candidates_of,
    locality_of,
    locality_request,
    models_of,
    pods_of,
)
from service.client.errors import from_rpc_error
from service.client.results import Candidate, Locality, ModelStatus, PodStatus

if TYPE_CHECKING:
    from service.api.generated.kvcache.v1.kvcache_pb2_grpc import KVCacheServiceAsyncStub

__all__ = ["AsyncKVCacheClient"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncKVCacheClient:
    """asyncio client of ``kvcache.v1.KVCacheService``; ``KVCacheClient``'s methods, awaited.

    ``target`` is an address (``"kv-cache:9090"``: the client opens a plaintext channel on
    its first call and closes it on ``close()`` or on leaving ``async with``) or a
    ``grpc.aio.Channel`` the caller made and keeps owning. A ``grpc.aio`` channel belongs to
    the event loop it is opened in, hence the late opening: the client may be built before
    the loop runs (in a plugin's constructor), then used in one loop.

    Token ids go as ``token_ids_packed`` (little-endian uint32 bytes: ~0.25 ms less CPU
    per 8192-token query than repeated varints); ``packed_token_ids=False`` sends the
    ``token_ids`` list, for services older than that field, which ignore it.

    Every call takes ``timeout`` seconds (None: this client's ``timeout``) and extra
    ``metadata``, sent after this client's. A failed call raises a ``KVCacheError``; a slow
    or unreachable service raises ``ServiceUnavailable``.
    """

    # ``timeout`` parameters (ASYNC109): the value is the call's gRPC deadline, sent to the
    # server so it stops working on an answer nobody waits for; asyncio.timeout cannot.

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: CallMetadata = (),
        packed_token_ids: bool = True,
    ) -> None:
        self._target = target if isinstance(target, str) else None
        self._channel = None if isinstance(target, str) else target
        self._stub: KVCacheServiceAsyncStub | None = None
        self._closed = False
        self._timeout = timeout
        self._metadata = tuple(metadata)
        self._packed = packed_token_ids

    async def locality(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        prompt: str | None = None,
        messages: ChatMessages | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: CallMetadata = (),
    ) -> Locality:
        """Which pods hold the longest cached prefix of the prompt, with tiers and scores.

        Give exactly one of ``token_ids`` (preferred), ``block_hashes``, ``prompt`` or
        ``messages``; ``pods`` restricts the answer to these candidates, each answered.
        """
        request = locality_request(
            model,
            token_ids,
            block_hashes,
            prompt,
            messages,
            lora_name,
            cache_salt,
            pods,
            packed=self._packed,
        )
        response = await self._call(self._service().Locality, request, timeout, metadata)
        return locality_of(response)

    async def score(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        prompt: str | None = None,
        messages: ChatMessages | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: CallMetadata = (),
    ) -> dict[str, float]:
        """Score in [0, 1] per pod label (``pod_id``, or ``pod_id@dp<r>`` for rank r > 0);
        arguments as ``locality``."""
        request = locality_request(
            model,
            token_ids,
            block_hashes,
            prompt,
            messages,
            lora_name,
            cache_salt,
            pods,
            packed=self._packed,
        )
        response = await self._call(self._service().Score, request, timeout, metadata)
        return dict(response.scores)

    async def candidates(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        prompt: str | None = None,
        messages: ChatMessages | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: CallMetadata = (),
    ) -> list[Candidate]:
        """The pods best first; with ``pods``, every candidate (unmatched ones last, score 0).
        Arguments as ``locality``."""
        request = locality_request(
            model,
            token_ids,
            block_hashes,
            prompt,
            messages,
            lora_name,
            cache_salt,
            pods,
            packed=self._packed,
        )
        response = await self._call(self._service().GetCandidates, request, timeout, metadata)
        return candidates_of(response)

    async def pods(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: CallMetadata = (),
    ) -> list[PodStatus]:
        """Every (pod, rank) event stream the service has seen (``GET /v1/pods``)."""
        request = kvcache_pb2.ListPodsRequest()
        return pods_of(await self._call(self._service().ListPods, request, timeout, metadata))

    async def models(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: CallMetadata = (),
    ) -> list[ModelStatus]:
        """Every model configured or seen in events (``GET /v1/models``)."""
        request = kvcache_pb2.ListModelsRequest()
        response = await self._call(self._service().ListModels, request, timeout, metadata)
        return models_of(response)

    async def close(self) -> None:
        """Closes the channel if this client opened it; later calls raise ``RuntimeError``."""
        self._closed, self._stub = True, None
        if self._target is not None and self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _service(self) -> KVCacheServiceAsyncStub:
        if self._closed:
            raise RuntimeError("the AsyncKVCacheClient is closed")
        if self._stub is None:
            if self._channel is None:
                assert self._target is not None
                self._channel = grpc.aio.insecure_channel(self._target)
            self._stub = kvcache_pb2_grpc.KVCacheServiceStub(self._channel)
        return self._stub

    async def _call(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,  # noqa: ASYNC109
        metadata: CallMetadata,
    ) -> _Response:
        try:
            return await rpc(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=(*self._metadata, *metadata),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
