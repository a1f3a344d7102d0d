"""The gRPC edge: ``kvcache.v1.KVCacheService``, llm-d's ``indexer.v1.IndexerService``, the
standard health service and server reflection, on one ``grpc.aio`` server.

Servicers only translate: request message -> ``LocalityQuery`` -> ``QueryService`` -> answer
message. Domain errors (``service/errors.py``) become status codes here, with their message;
anything else is logged and answered ``INTERNAL`` with a generic message.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias

import grpc
import structlog
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.generated.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.api.query import LocalityAnswer, LocalityQuery, QueryService, pod_label
from service.errors import InvalidQuery, NotSupported, QueryError, QueryTooLarge, Unavailable
from service.index.keys import TOKEN_TYPECODE
from service.status import ModelStatus, PodStatus

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SERVICE_NAMES",
    "GrpcApi",
    "grpc_address",
    "start_grpc_server",
    "status_code_of",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
"""``api.max_body_bytes``' default; a larger request gets RESOURCE_EXHAUSTED from grpc."""

SERVICE_NAMES: Final = (
    kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name,
    indexer_pb2.DESCRIPTOR.services_by_name["IndexerService"].full_name,
)
"""The application services; each has its own health status, as does the server ("")."""

_API: Final = "grpc"  # the ``api`` label of the query duration metric
_INTERNAL_DETAILS: Final = "internal error; the service log has the details"
_STATUS_BY_ERROR: Final[tuple[tuple[type[QueryError], grpc.StatusCode], ...]] = (
    (InvalidQuery, grpc.StatusCode.INVALID_ARGUMENT),
    (QueryTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotSupported, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)

_log = structlog.get_logger("kv_cache.grpc")

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def status_code_of(error: QueryError) -> grpc.StatusCode:
    """The status code a domain error is answered with (UNKNOWN for an unmapped kind)."""
    for kind, code in _STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.UNKNOWN


@asynccontextmanager
async def _edge(context: _Context, rpc: str) -> AsyncIterator[None]:
    """Ends the RPC with the status its exception calls for."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except QueryError as error:
        await context.abort(status_code_of(error), str(error))
    except Exception:
        # Never str(error) to the caller: it may carry internals (addresses, keys).
        _log.exception("grpc_request_failed", rpc=rpc)
        await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_DETAILS)


def _locality_query(request: kvcache_pb2.LocalityRequest) -> LocalityQuery:
    """The domain query of a request; an empty repeated field counts as not given."""
    token_ids: Sequence[int] | None = request.token_ids[:] or None  # a list reads faster
    if request.token_ids_packed:
        token_ids = _unpack_token_ids(request.token_ids_packed, given_list=token_ids is not None)
    return LocalityQuery(
        model=request.model,
        token_ids=token_ids,
        block_hashes=request.block_hashes or None,
        prompt=request.prompt if request.HasField("prompt") else None,
        messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
        tools=[json_format.MessageToDict(tool) for tool in request.tools] or None,
        lora_name=request.lora_name if request.HasField("lora_name") else None,
        cache_salt=request.cache_salt if request.HasField("cache_salt") else None,
        pods=list(request.pods) or None,
    )


def _unpack_token_ids(packed: bytes, *, given_list: bool) -> array[int]:
    if given_list:
        raise InvalidQuery("give token_ids or token_ids_packed, not both")
    if len(packed) % 4:
        raise InvalidQuery(
            f"token_ids_packed: {len(packed)} bytes is not a whole number of token ids"
            " (little-endian uint32, 4 bytes each)"
        )
    token_ids = array(TOKEN_TYPECODE)
    token_ids.frombytes(packed)
    if sys.byteorder != "little":
        token_ids.byteswap()
    return token_ids


def _locality_response(answer: LocalityAnswer) -> kvcache_pb2.LocalityResponse:
    """``/v1/locality``'s answer as a message."""
    block_size = answer.block_size or 0
    locality = answer.locality
    return kvcache_pb2.LocalityResponse(
        model=answer.model,
        block_size=answer.block_size,
        total_blocks=locality.total_blocks,
        cache_hits=locality.cache_hits,
        coverage=locality.coverage,
        pods=[
            kvcache_pb2.PodLocality(
                pod_id=p.pod.pod_id,
                dp_rank=p.pod.dp_rank,
                match_length=p.match_length,
                matched_tokens=p.match_length * block_size,
                block_count=p.block_count,
                tiers=p.tiers,
                score=p.score,
            )
            for p in locality.pods
        ],
    )


def _pod_status(pod: PodStatus) -> kvcache_pb2.PodStatus:
    return kvcache_pb2.PodStatus(
        pod_id=pod.pod_id,
        dp_rank=pod.dp_rank,
        model=pod.model,
        blocks=pod.blocks,
        state=pod.state,
        last_event_time=pod.last_event_time,
        last_seq=pod.last_seq,
        batches=pod.batches,
        gaps=pod.gaps,
        lost_batches=pod.lost_batches,
        replays=pod.replays,
        restarts=pod.restarts,
    )


def _model_status(model: ModelStatus) -> kvcache_pb2.ModelStatus:
    return kvcache_pb2.ModelStatus(
        name=model.name,
        key_mode=model.key_mode,
        configured=model.configured,
        block_size=model.block_size,
        blocks=model.blocks,
        pods=model.pods,
        hash_matches=model.hash_matches,
        hash_mismatches=model.hash_mismatches,
    )


class _KVCacheServicer(kvcache_pb2_grpc.KVCacheServiceServicer):
    """``kvcache.v1.KVCacheService`` over a ``QueryService``."""

    def __init__(self, queries: QueryService) -> None:
        self._queries = queries

    async def Locality(
        self, request: kvcache_pb2.LocalityRequest, context: _Context
    ) -> kvcache_pb2.LocalityResponse:
        async with _edge(context, "Locality"):
            answer = await self._queries.locality(_locality_query(request), api=_API)
            return _locality_response(answer)

    async def Score(
        self, request: kvcache_pb2.LocalityRequest, context: _Context
    ) -> kvcache_pb2.ScoreResponse:
        async with _edge(context, "Score"):
            answer = await self._queries.locality(_locality_query(request), api=_API)
            return kvcache_pb2.ScoreResponse(model=answer.model, scores=answer.scores())

    async def GetCandidates(
        self, request: kvcache_pb2.LocalityRequest, context: _Context
    ) -> kvcache_pb2.GetCandidatesResponse:
        async with _edge(context, "GetCandidates"):
            answer = await self._queries.locality(_locality_query(request), api=_API)
            return kvcache_pb2.GetCandidatesResponse(
                model=answer.model,
                total_blocks=answer.locality.total_blocks,
                candidates=[
                    kvcache_pb2.Candidate(
                        pod=pod_label(p.pod), score=p.score, match_length=p.match_length
                    )
                    for p in answer.locality.pods
                ],
            )

    async def ListPods(
        self, request: kvcache_pb2.ListPodsRequest, context: _Context
    ) -> kvcache_pb2.ListPodsResponse:
        async with _edge(context, "ListPods"):
            pods = await self._queries.pods()
            return kvcache_pb2.ListPodsResponse(pods=[_pod_status(p) for p in pods])

    async def ListModels(
        self, request: kvcache_pb2.ListModelsRequest, context: _Context
    ) -> kvcache_pb2.ListModelsResponse:
        async with _edge(context, "ListModels"):
            models = await self._queries.models()
            return kvcache_pb2.ListModelsResponse(models=[_model_status(m) for m in models])


class _IndexerServicer(indexer_pb2_grpc.IndexerServiceServicer):
    """llm-d's ``indexer.v1.IndexerService``: prompt text in, a score per pod out, best first.

    ``pod`` is the pod id and ``data_parallel_rank`` is set for ranks > 0, as llm-d splits
    its ``pod@dp<r>`` scoring keys.
    """

    def __init__(self, queries: QueryService) -> None:
        self._queries = queries

    async def GetPodScores(
        self, request: indexer_pb2.GetPodScoresRequest, context: _Context
    ) -> indexer_pb2.GetPodScoresResponse:
        async with _edge(context, "GetPodScores"):
            query = LocalityQuery(
                model=request.model_name,
                prompt=request.prompt,
                pods=list(request.pod_identifiers) or None,
            )
            answer = await self._queries.locality(query, api=_API)
            return indexer_pb2.GetPodScoresResponse(
                scores=[
                    indexer_pb2.PodScore(
                        pod=p.pod.pod_id,
                        score=p.score,
                        data_parallel_rank=p.pod.dp_rank or None,
                    )
                    for p in answer.locality.pods
                ]
            )


class GrpcApi:
    """The gRPC server: both APIs, health and reflection. Owned by the composition root.

    May be built outside the event loop; the ``grpc.aio`` server is created in ``start``,
    since it binds to the loop running when it is created.

    Health: the server ("") and each of ``SERVICE_NAMES`` are SERVING while the service is
    ready; call ``refresh_health`` (or ``set_serving``) when readiness may have changed.
    ``stop`` turns every status NOT_SERVING before draining, so balancers stop first.
    """

    def __init__(
        self, queries: QueryService, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self._queries = queries
        self._max_message_bytes = max_message_bytes
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None

    @property
    def server(self) -> grpc.aio.Server:
        """The running server; raises before ``start``."""
        if self._server is None:
            raise RuntimeError("the gRPC server is not started")
        return self._server

    @property
    def port(self) -> int:
        """The bound port; raises before ``start``."""
        if self._port is None:
            raise RuntimeError("the gRPC server is not started")
        return self._port

    async def start(self, host: str, port: int) -> int:
        """Sets health from readiness, binds ``host:port`` (0: a free port), starts serving.

        Returns the bound port. Raises ``OSError`` when the address cannot be bound.
        """
        return await self.start_at(grpc_address(host, port))

    async def start_at(self, address: str) -> int:
        """``start`` on any gRPC address, e.g. ``unix:/path`` behind the native front."""
        if self._server is not None:
            raise RuntimeError("the gRPC server is already started")
        await self.refresh_health()
        self._server = server = self._build()
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot bind gRPC to {address}: {error}") from error
        if bound == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._port = bound
        return bound

    def _build(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                # grpc sets SO_REUSEPORT by default: a second server on a taken port would
                # then start "fine" and steal half the connections.
                ("grpc.so_reuseport", 0),
            ]
        )
        kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(
            _KVCacheServicer(self._queries), server
        )
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(
            _IndexerServicer(self._queries), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def refresh_health(self) -> bool:
        """Sets every health status from ``QueryService.readiness()``; returns readiness."""
        ready = (await self._queries.readiness()).ready
        await self.set_serving(ready)
        return ready

    async def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for the server and each application service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in _health_names():
            await self._health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING for good, then stop; in-flight RPCs get ``grace`` seconds to finish.

        Safe before ``start`` and after a failed one.
        """
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)


def grpc_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _health_names() -> Sequence[str]:
    return (health.OVERALL_HEALTH, *SERVICE_NAMES)


async def start_grpc_server(
    queries: QueryService,
    host: str,
    port: int,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """Starts a ``GrpcApi`` and returns its server and bound port (``port`` 0: a free one).

    Health is set from readiness once, at start; a daemon whose readiness changes should
    own a ``GrpcApi`` instead, to call ``refresh_health`` and ``stop``.
    """
    api = GrpcApi(queries, max_message_bytes=max_message_bytes)
    bound = await api.start(host, port)
    return api.server, bound
