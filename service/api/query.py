"""Query logic shared by REST and gRPC: validate, key, look up, score.

The API edges only translate messages to ``LocalityQuery`` and answers back; every rule of
CONTRACT.md section 4 lives here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.errors import InvalidQuery, NotSupported, QueryTooLarge
from service.index.protocol import BlockIndex, PodRank
from service.models import ModelRegistry
from service.prompts import PromptEncoders
from service.scoring import Locality, TierWeights, score_matches
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
        index: BlockIndex,
        models: ModelRegistry,
        *,
        weights: TierWeights,
        max_tokens: int,
        observe: Callable[[str, float, LocalityAnswer | None], None] | None = None,
        status: StatusSource | None = None,
        prompts: PromptEncoders | None = None,
    ) -> None:
        self._index = index
        self._models = models
        self._weights = weights
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
        keying = self._models.get(query.model)
        keys: list[int] = []
        if token_ids is not None:
            if len(token_ids) > self._max_tokens:
                what = "token ids" if query.token_ids is not None else "tokens in the prompt"
                raise QueryTooLarge(
                    f"{len(token_ids)} {what} exceed api.max_tokens ({self._max_tokens})"
                )
            if keying is not None and keying.translator.block_size is not None:
                try:
                    keys = keying.translator.query_keys(
                        token_ids, lora_name=query.lora_name, cache_salt=query.cache_salt
                    )
                except ValueError as error:
                    raise InvalidQuery(f"token_ids: {error}") from None
            elif query.token_ids is not None:  # a tokenizer's ids need no checking
                _check_token_ids(token_ids)
        elif query.block_hashes is not None:
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
            if keying is not None:
                keys = keying.translator.keys_of_engine_hashes(query.block_hashes)
        total_blocks = len(keys)
        if query.block_hashes is not None:
            total_blocks = len(query.block_hashes)
        matches = await self._index.lookup(query.model, keys) if keys else []
        candidates = None
        if query.pods is not None:
            candidates = _candidates(query.pods, [m.pod for m in matches])
        locality = score_matches(matches, total_blocks, self._weights, candidates)
        block_size = keying.translator.block_size if keying is not None else None
        return LocalityAnswer(query.model, block_size, locality)

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


def _check_token_ids(token_ids: Sequence[int]) -> None:
    for position, token in enumerate(token_ids):
        if type(token) is not int or not 0 <= token < 1 << 32:
            raise InvalidQuery(f"token_ids[{position}] = {token!r} is not an int in [0, 2**32)")


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
