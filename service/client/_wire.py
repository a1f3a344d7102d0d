"""Python values to ``kvcache.v1`` messages and back, shared by both clients.

Only type conversion happens here; every rule about what a request may hold lives in the
server (``service/api/query.py``), so the client never disagrees with it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias, cast

import grpc

from service.api.generated.kvcache.v1 import kvcache_pb2
from service.client.errors import InvalidRequest
from service.client.results import Candidate, Locality, PodLocality
from service.index.keys import TOKEN_TYPECODE
from service.status import ModelStatus, PodState, PodStatus

__all__ = [
    "DEFAULT_TIMEOUT",
    "CallMetadata",
    "ChatMessages",
    "candidates_of",
    "locality_of",
    "locality_request",
    "models_of",
    "pods_of",
]

DEFAULT_TIMEOUT: Final = 0.05
"""Seconds per call: a scheduler's budget, after which it scores without the cache."""

CallMetadata: TypeAlias = Sequence[tuple[str, str | bytes]]
ChatMessages: TypeAlias = Sequence[Mapping[str, str]]


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as ``token_ids_packed`` carries them: little-endian uint32. Raises
    ``ValueError`` naming the first value that is not an int in [0, 2**32)."""
    if isinstance(token_ids, str | bytes):
        raise TypeError(f"expected a sequence, got {type(token_ids).__name__}")
    try:
        packed = array(TOKEN_TYPECODE, token_ids)
    except (TypeError, OverflowError):
        for position, token in enumerate(token_ids):
            if type(token) is not int or not 0 <= token < 1 << 32:
                raise ValueError(f"[{position}] = {token!r} is not an int in [0, 2**32)") from None
        raise
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def locality_request(
    model: str,
    token_ids: Sequence[int] | None,
    block_hashes: Sequence[int] | None,
    prompt: str | None,
    messages: ChatMessages | None,
    lora_name: str | None,
    cache_salt: str | None,
    pods: Sequence[str] | None,
    *,
    packed: bool = True,
) -> kvcache_pb2.LocalityRequest:
    """The request message; ``InvalidRequest`` naming the field for a value protobuf cannot
    encode (a negative token id, a string where a list belongs, a message without a role)."""
    request = kvcache_pb2.LocalityRequest()
    field = "model"
    try:
        request.model = model
        for field, text in (
            ("prompt", prompt),
            ("lora_name", lora_name),
            ("cache_salt", cache_salt),
        ):
            if text is not None:
                setattr(request, field, text)
        field = "token_ids"
        if token_ids is not None:
            try:
                packed_ids = pack_token_ids(token_ids)
            except ValueError as error:
                raise InvalidRequest(
                    f"token_ids{error}", grpc.StatusCode.INVALID_ARGUMENT
                ) from None
            if packed:
                request.token_ids_packed = packed_ids
            else:
                request.token_ids.extend(token_ids)
        for field, values in (
            ("block_hashes", block_hashes),
            ("pods", pods),
        ):
            # A str is a sequence too: pods="a:1" would silently become three one-letter pods.
            if isinstance(values, str | bytes):
                raise TypeError(f"expected a sequence, got {type(values).__name__}")
            if values is not None:
                getattr(request, field).extend(values)
        field = "messages"
        for message in messages or ():
            request.messages.add(role=message["role"], content=message["content"])
    except KeyError as error:
        detail = f"messages: every message needs a role and a content (missing {error})"
        raise InvalidRequest(detail, grpc.StatusCode.INVALID_ARGUMENT) from error
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"{field}: {error}", grpc.StatusCode.INVALID_ARGUMENT) from error
    return request


def locality_of(response: kvcache_pb2.LocalityResponse) -> Locality:
    return Locality(
        model=response.model,
        block_size=response.block_size if response.HasField("block_size") else None,
        total_blocks=response.total_blocks,
        cache_hits=response.cache_hits,
        coverage=response.coverage,
        pods=tuple(
            PodLocality(
                pod_id=p.pod_id,
                dp_rank=p.dp_rank,
                match_length=p.match_length,
                matched_tokens=p.matched_tokens,
                block_count=p.block_count,
                tiers=dict(p.tiers),
                score=p.score,
            )
            for p in response.pods
        ),
    )


def candidates_of(response: kvcache_pb2.GetCandidatesResponse) -> list[Candidate]:
    return [Candidate(c.pod, c.score, c.match_length) for c in response.candidates]


def pods_of(response: kvcache_pb2.ListPodsResponse) -> list[PodStatus]:
    return [
        PodStatus(
            pod_id=p.pod_id,
            dp_rank=p.dp_rank,
            model=p.model if p.HasField("model") else None,
            blocks=p.blocks,
            state=cast(PodState, p.state),  # the server's PodState, sent as a string
            last_event_time=p.last_event_time if p.HasField("last_event_time") else None,
            last_seq=p.last_seq if p.HasField("last_seq") else None,
            batches=p.batches,
            gaps=p.gaps,
            lost_batches=p.lost_batches,
            replays=p.replays,
            restarts=p.restarts,
        )
        for p in response.pods
    ]


def models_of(response: kvcache_pb2.ListModelsResponse) -> list[ModelStatus]:
    return [
        ModelStatus(
            name=m.name,
            key_mode=m.key_mode,
            configured=m.configured,
            block_size=m.block_size if m.HasField("block_size") else None,
            blocks=m.blocks,
            pods=m.pods,
            hash_matches=m.hash_matches,
            hash_mismatches=m.hash_mismatches,
        )
        for m in response.models
    ]
