"""Query logic shared by REST and gRPC: validate, key, look up, score.

The API edges only translate messages to ``LocalityQuery`` and answers back; every rule of
CONTRACT.md section 4 lives here once.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.dataplane.protocol import DataPlane
from service.errors import InvalidQuery, NotSupported, QueryTooLarge
from service.index.keys import TOKEN_TYPECODE
from service.index.protocol import PodRank
from service.prompts import PromptEncoders
from service.scoring import Locality, locality
from service.status import ModelStatus, PodStatus, Readiness, StatusSource

__all__ = [
    "LocalityAnswer",
    "LocalityQuery",
    "QueryService",
    "parse_pod_label",
    "pod_label",
]

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class LocalityQuery:
    """One prompt to score. Exactly one of token_ids, block_hashes, prompt, messages.

    ``prompt`` is tokenised as vLLM's ``/v1/completions`` does, ``messages`` (with the
    optional OpenAI-style ``tools``) rendered and tokenised as ``/v1/chat/completions``.
    """

    model: str
    token_ids: Sequence[int] | None = None
    block_hashes: Sequence[int] | None = None
    prompt: str | None = None
    messages: Sequence[Mapping[str, object]] | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    pods: Sequence[str] | None = None
    tools: Sequence[Mapping[str, object]] | None = None


@dataclass(frozen=True, slots=True)
class LocalityAnswer:
    """A ``Locality`` for one model; ``block_size`` is None while the model is unknown."""

    model: str
    block_size: int | None
    locality: Locality

    def scores(self) -> dict[str, float]:
        """``/v1/score``'s map: ``pod_id`` for rank 0, ``pod_id@dp<r>`` otherwise."""
        return {pod_label(p.pod): p.score for p in self.locality.pods}


def pod_label(pod: PodRank) -> str:
    return str(pod)


def parse_pod_label(label: str) -> tuple[str, int | None]:
    """``"10.0.0.7:8000@dp2"`` -> ("10.0.0.7:8000", 2); a bare pod id -> (id, None)."""
    pod_id, sep, rank = label.rpartition("@dp")
    if sep and pod_id and rank.isdigit():
        return pod_id, int(rank)
    return label, None


class QueryService:
    """Answers locality and score queries against the index.

    Without ``prompts``, ``prompt`` and ``messages`` queries are ``NotSupported``.
    """

    def __init__(
        self,
        plane: DataPlane,
        *,
        max_tokens: int,
        observe: Callable[[str, float, LocalityAnswer | None], None] | None = None,
        status: StatusSource | None = None,
        prompts: PromptEncoders | None = None,
    ) -> None:
        self._plane = plane
        self._max_tokens = max_tokens
        self._observe = observe
        self._status = status
        self._prompts = prompts

    async def pods(self) -> list[PodStatus]:
        """What ``/v1/pods`` lists: every (pod, rank) stream seen, per model."""
        return await self._status.pods() if self._status is not None else []

    async def models(self) -> list[ModelStatus]:
        """What ``/v1/models`` lists: every model configured or seen in events."""
        return await self._status.models() if self._status is not None else []

    async def readiness(self) -> Readiness:
        """What ``/readyz`` and the gRPC health service report."""
        return await self._status.readiness() if self._status is not None else Readiness(True)

    async def locality(self, query: LocalityQuery, *, api: str = "internal") -> LocalityAnswer:
        """The contract's ``/v1/locality`` answer. Raises ``QueryError`` subclasses."""
        start = time.perf_counter()
        answer = None
        try:
            answer = await self._answer(query)
            return answer
        finally:
            if self._observe is not None:
                self._observe(api, time.perf_counter() - start, answer)

    async def _answer(self, query: LocalityQuery) -> LocalityAnswer:
        if not query.model:
            raise InvalidQuery("model is required")
        given = [
            name
            for name in ("token_ids", "block_hashes", "prompt", "messages")
            if getattr(query, name) is not None
        ]
        if len(given) != 1:
            raise InvalidQuery(
                "give exactly one of token_ids, block_hashes, prompt or messages"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if query.tools is not None and query.messages is None:
            raise InvalidQuery("tools apply to messages only")
        token_ids = query.token_ids
        if query.prompt is not None or query.messages is not None:
            token_ids = await self._tokenise(query)
        if token_ids is not None:
            if len(token_ids) > self._max_tokens:
                what = "token ids" if query.token_ids is not None else "tokens in the prompt"
                raise QueryTooLarge(
                    f"{len(token_ids)} {what} exceed api.max_tokens ({self._max_tokens})"
                )
            if query.token_ids is not None:  # a tokenizer's ids need no checking
                token_ids = _checked_token_ids(token_ids)
            found = await self._plane.lookup(
                query.model,
                token_ids=token_ids,
                lora_name=query.lora_name,
                cache_salt=query.cache_salt,
            )
        else:
            assert query.block_hashes is not None
            if query.lora_name is not None or query.cache_salt is not None:
                raise InvalidQuery(
                    "lora_name and cache_salt apply to token_ids; engine block hashes"
                    " already include them"
                )
            if len(query.block_hashes) > self._max_tokens:
                raise QueryTooLarge(
                    f"{len(query.block_hashes)} block hashes exceed api.max_tokens"
                    f" ({self._max_tokens})"
                )
            for position, value in enumerate(query.block_hashes):
                if type(value) is not int or not 0 <= value < _U64:
                    raise InvalidQuery(
                        f"block_hashes[{position}] = {value!r} is not an unsigned 64-bit int"
                    )
            found = await self._plane.lookup(query.model, block_hashes=query.block_hashes)
        candidates = None
        if query.pods is not None:
            candidates = _candidates(query.pods, [p.pod for p in found.pods])
        answer = locality(found.pods, found.total_blocks, candidates)
        return LocalityAnswer(query.model, found.block_size, answer)

    async def _tokenise(self, query: LocalityQuery) -> Sequence[int]:
        """The token ids of a ``prompt`` or ``messages`` query, as the engine will see them."""
        if self._prompts is None:
            raise NotSupported(
                f"model {query.model!r} has no tokenizer configured (models[].tokenizer);"
                " send token_ids instead"
            )
        encoder = await self._prompts.get(query.model)
        if query.prompt is not None:
            return await encoder.prompt_ids(query.prompt)
        assert query.messages is not None
        return await encoder.chat_ids(query.messages, query.tools)


def _checked_token_ids(token_ids: Sequence[int]) -> Sequence[int]:
    """The ids as a uint32 array (packed already: no copy); InvalidQuery names a bad one."""
    if isinstance(token_ids, array) and token_ids.typecode == TOKEN_TYPECODE:
        return token_ids
    try:
        return array(TOKEN_TYPECODE, token_ids)
    except (TypeError, OverflowError):
        for position, token in enumerate(token_ids):
            if type(token) is not int or not 0 <= token < 1 << 32:
                raise InvalidQuery(
                    f"token_ids[{position}] = {token!r} is not an int in [0, 2**32)"
                ) from None
        raise InvalidQuery("token_ids: not a list of ints") from None


def _candidates(labels: Sequence[str], matched: Sequence[PodRank]) -> list[PodRank]:
    """Candidate pods: ``id@dp<r>`` names one rank; a bare id every matched rank (or rank 0)."""
    wanted: list[PodRank] = []
    for label in labels:
        if not isinstance(label, str) or not label:
            raise InvalidQuery(f"pods: {label!r} is not a pod id")
        pod_id, rank = parse_pod_label(label)
        if rank is not None:
            wanted.append(PodRank(pod_id, rank))
            continue
        ranks = [p for p in matched if p.pod_id == pod_id]
        wanted.extend(ranks or [PodRank(pod_id, 0)])
    return wanted
