"""The REST API's request and response bodies, as pydantic models.

Requests are validated with these models straight from the body bytes. Responses are built
as plain dicts on the hot path; the response models document them in the OpenAPI schema,
and the tests check that what the service sends validates against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.status import ModelStatus, PodStatus

__all__ = [
    "ErrorResponse",
    "FieldError",
    "HealthResponse",
    "LocalityRequest",
    "LocalityResponse",
    "ModelsResponse",
    "PodLocality",
    "PodsResponse",
    "ReadyResponse",
    "ScoreResponse",
]

# Ranges are documented here but checked by the query layer, which names the bad position:
# pydantic's constrained ints cost twice as much per item as plain strict ints.
_TokenId = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 2**32 - 1})]
_BlockHash = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 2**64 - 1})]
# Messages go to the model's chat template as they are; only their container is checked.
_ChatMessage = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "properties": {
                "role": {"type": "string"},
                "content": {"anyOf": [{"type": "string"}, {"type": "array"}]},
            },
            "required": ["role"],
        }
    ),
]


class LocalityRequest(BaseModel):
    """A prompt to score: exactly one of ``token_ids``, ``block_hashes``, ``prompt``,
    ``messages``. Unknown fields are rejected, so a misspelt option never goes unnoticed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(min_length=1, description="Model name, as vLLM publishes it.")
    token_ids: list[_TokenId] | None = Field(
        None, description="The prompt's token ids (preferred: exact)."
    )
    block_hashes: list[_BlockHash] | None = Field(
        None, description="A chain of engine block hashes, first block first."
    )
    prompt: str | None = Field(
        None, description="Prompt text, tokenised with the model's tokenizer."
    )
    messages: list[_ChatMessage] | None = Field(
        None, description="Chat messages, rendered with the model's chat template."
    )
    tools: list[dict[str, Any]] | None = Field(
        None, description="OpenAI-style tools, passed to the chat template with `messages`."
    )
    lora_name: str | None = Field(None, description="LoRA adapter the prompt runs with.")
    cache_salt: str | None = Field(None, description="vLLM cache_salt of the request.")
    pods: list[str] | None = Field(
        None,
        description="Candidate pods (`pod_id` or `pod_id@dp<r>`); each appears in the answer,"
        " with score 0 if it holds nothing.",
    )


class PodLocality(BaseModel):
    """How much of the prompt one (pod, data-parallel rank) holds."""

    pod_id: str
    dp_rank: int = Field(description="Data-parallel rank; 0 without data parallelism.")
    match_length: int = Field(description="Consecutive blocks from the first held, any tier.")
    matched_tokens: int = Field(description="match_length * block_size.")
    block_count: int = Field(description="Blocks of the prompt held anywhere.")
    tiers: dict[Literal["gpu", "cpu", "disk"], int] = Field(
        description="Blocks of the matched prefix per tier; zero counts are left out."
    )
    score: float = Field(ge=0.0, le=1.0, description="Tier-weighted match_length/total_blocks.")


class LocalityResponse(BaseModel):
    """``/v1/locality``: pods sorted by score, then pod_id, then dp_rank."""

    model: str
    block_size: int | None = Field(description="Learnt from events; null while unknown.")
    total_blocks: int
    cache_hits: int = Field(description="The best pod's match_length.")
    coverage: float = Field(description="cache_hits / total_blocks.")
    pods: list[PodLocality]


class ScoreResponse(BaseModel):
    """``/v1/score``: keys are ``pod_id`` for rank 0, ``pod_id@dp<r>`` for rank r."""

    model: str
    scores: dict[str, float]


class PodsResponse(BaseModel):
    """Every (pod, rank) stream seen."""

    pods: list[PodStatus]


class ModelsResponse(BaseModel):
    """Every model configured or seen in events."""

    models: list[ModelStatus]


class HealthResponse(BaseModel):
    """The process is alive."""

    status: Literal["ok"]


class ReadyResponse(BaseModel):
    """Ready to answer (200), or not (503, with ``reasons``)."""

    status: Literal["ready", "not ready"]
    reasons: list[str] | None = Field(None, description="Only when not ready.")
    warnings: list[str] = Field(description="Trouble that does not stop answers.")


class FieldError(BaseModel):
    """One validation failure; ``loc`` is the path to the bad value."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: ``detail`` says what is wrong, naming the field."""

    detail: str
    errors: list[FieldError] | None = Field(None, description="Validation errors (422) only.")
