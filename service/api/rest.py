"""The REST edge: routes of CONTRACT.md section 4 over ``QueryService``.

Handlers only translate: JSON to ``LocalityQuery``, answers to JSON, and the service's
exception tree (``service/errors.py``) to status codes. This is a hot path: a body of token
ids (and options) is read by msgspec and the C token reader, with no Python int per token
(``_plain_query``); any other body is validated straight from the bytes
(``model_validate_json``: ~0.2 ms for 8192 token ids, against ~0.7 ms for FastAPI's
``json.loads`` then validate). Answers are built as dicts, not through ``response_model``,
and written by msgspec.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import msgspec
import structlog
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service._dataplane import parse_plain_locality
from service.api.query import LocalityAnswer, LocalityQuery, QueryService
from service.api.rest_models import (
    ErrorResponse,
    HealthResponse,
    LocalityRequest,
    LocalityResponse,
    ModelsResponse,
    PodsResponse,
    ReadyResponse,
    ScoreResponse,
)
from service.errors import InvalidQuery, NotSupported, QueryError, QueryTooLarge, Unavailable
from service.index.keys import TOKEN_TYPECODE
from service.status import Readiness

__all__ = ["RestApp", "create_rest_app"]

log = structlog.get_logger("kv_cache.rest")

_STATUS_OF: dict[type[QueryError], int] = {
    InvalidQuery: 400,
    QueryTooLarge: 413,
    NotSupported: 422,
    Unavailable: 503,
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed query or body not JSON"},
    413: {"model": ErrorResponse, "description": "Over api.max_body_bytes or api.max_tokens"},
    422: {"model": ErrorResponse, "description": "Invalid field, or no tokenizer for text"},
    503: {"model": ErrorResponse, "description": "The index cannot answer now"},
}
_QUERY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": LocalityRequest.model_json_schema()}},
    }
}
_GET_PARAMS = frozenset({"model", "prefix", "pods"})
_MAX_HASH_DIGITS = len(str(2**64 - 1))
_ERRORS_SHOWN = 3  # in ``detail``; ``errors`` lists up to _ERRORS_LISTED
_ERRORS_LISTED = 20


def create_rest_app(
    queries: QueryService, registry: CollectorRegistry, *, max_body_bytes: int
) -> RestApp:
    """The HTTP app: queries, status, health and ``/metrics``; OpenAPI at ``/docs``.

    Bodies over ``max_body_bytes`` get 413 before any parsing.
    """
    app = FastAPI(
        title="kv-cache",
        version=_version(),
        description="KV-cache-aware routing for vLLM: which pods hold a prompt's prefix.",
    )

    @app.post(
        "/v1/locality",
        response_model=LocalityResponse,
        responses=_ERRORS,
        openapi_extra=_QUERY_BODY,
        summary="Pods holding the longest cached prefix of a prompt",
    )
    async def post_locality(request: Request) -> Response:
        answer = await queries.locality(await _read_query(request), api="rest")
        return _Json(_locality_json(answer))

    @app.get(
        "/v1/locality",
        response_model=LocalityResponse,
        responses=_ERRORS,
        summary="Locality of a chain of engine block hashes",
    )
    async def get_locality(
        request: Request,
        model: Annotated[str, Query(min_length=1, description="Model name")],
        prefix: Annotated[
            str, Query(description="Engine block hashes, decimal, comma-separated, first first")
        ],
        pods: Annotated[str | None, Query(description="Candidate pods, comma-separated")] = None,
    ) -> Response:
        unknown = sorted(request.query_params.keys() - _GET_PARAMS)
        if unknown:
            raise InvalidQuery(
                f"unknown query parameter(s) {', '.join(unknown)};"
                f" expected {', '.join(sorted(_GET_PARAMS))}"
            )
        query = LocalityQuery(
            model=model,
            block_hashes=_parse_prefix(prefix),
            pods=None if pods is None else pods.split(","),
        )
        return _Json(_locality_json(await queries.locality(query, api="rest")))

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        openapi_extra=_QUERY_BODY,
        summary="Score per pod for a prompt",
    )
    async def post_score(request: Request) -> Response:
        answer = await queries.locality(await _read_query(request), api="rest")
        return _Json({"model": answer.model, "scores": answer.scores()})

    @app.get("/v1/pods", response_model=PodsResponse, summary="Tracked engine streams")
    async def get_pods() -> Response:
        pods = await queries.pods()
        return _Json({"pods": [dataclasses.asdict(p) for p in pods]})

    @app.get("/v1/models", response_model=ModelsResponse, summary="Tracked models")
    async def get_models() -> Response:
        models = await queries.models()
        return _Json({"models": [dataclasses.asdict(m) for m in models]})

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness")
    async def healthz() -> Response:
        return _Json({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "Not ready"}},
        summary="Readiness: 503 only when the service cannot answer at all",
    )
    async def readyz() -> Response:
        try:
            readiness = await queries.readiness()
        except Exception:
            log.exception("readiness check failed")
            readiness = Readiness(False, ("readiness check failed; see the service log",))
        if readiness.ready:
            return _Json({"status": "ready", "warnings": list(readiness.warnings)})
        body = {
            "status": "not ready",
            "reasons": list(readiness.reasons),
            "warnings": list(readiness.warnings),
        }
        return _Json(body, status_code=503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
        summary="Prometheus metrics",
    )
    async def metrics(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"content-type": content_type})

    app.add_exception_handler(QueryError, _on_query_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(_LimitBody, max_body_bytes=max_body_bytes)
    app.add_middleware(_CatchAll)
    return RestApp(app, queries, max_body_bytes)


class RestApp:
    """The ASGI app served: the query hot path in front, FastAPI (``fastapi``) for the rest.

    ``POST /v1/locality`` and ``/v1/score`` with a body of token ids and options
    (``_plain_query``) are answered here, without FastAPI's routing, dependency and
    middleware layers (measured: about half of a query's server time). Every other request,
    and every body the fast reader refuses, goes to FastAPI whole, so validation, errors and
    OpenAPI stay FastAPI's; the answers are the same bytes either way.
    """

    def __init__(self, app: FastAPI, queries: QueryService, max_body_bytes: int) -> None:
        self.fastapi = app
        self._queries = queries
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in _FAST_PATHS:
            await self.fastapi(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self._max_body_bytes:
            await self.fastapi(scope, receive, send)  # its _LimitBody answers 413
            return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk: bytes = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body_bytes or not message.get("more_body", False):
                break
        body = b"".join(chunks)
        query = _plain_query(body) if size <= self._max_body_bytes else None
        if query is None:
            await self.fastapi(scope, _replay(body, receive), send)
            return
        try:
            answer = await self._queries.locality(query, api="rest")
        except QueryError as error:
            status = next((s for cls, s in _STATUS_OF.items() if isinstance(error, cls)), 400)
            await _send_json(send, status, {"detail": str(error)})
            return
        except Exception:
            log.exception("unhandled error in a REST request", path=path)
            await _send_json(send, 500, {"detail": "internal error; see the service log"})
            return
        if path == "/v1/score":
            await _send_json(send, 200, {"model": answer.model, "scores": answer.scores()})
        else:
            await _send_json(send, 200, _locality_json(answer))


_FAST_PATHS = frozenset({"/v1/locality", "/v1/score"})
_JSON_HEADERS = (b"content-type", b"application/json")


async def _send_json(send: Send, status: int, content: object) -> None:
    body = msgspec.json.encode(content)
    headers = [(b"content-length", str(len(body)).encode()), _JSON_HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) first, then the real one."""
    pending: Message | None = {"type": "http.request", "body": body, "more_body": False}

    async def replayed() -> Message:
        nonlocal pending
        if pending is None:
            return await receive()
        message, pending = pending, None
        return message

    return replayed


class _Json(JSONResponse):
    """JSON written by msgspec: the same compact UTF-8 text as Starlette's ``json.dumps``,
    ~10x faster for a query's answer."""

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def _plain_query(raw: bytes) -> LocalityQuery | None:
    """The query of a body of token ids and options, read natively in one pass (~30 us for
    8192 ids, against ~250 us through pydantic); None for any other body, which the
    validated path then reads and, if need be, names the problem of. What this accepts,
    that path accepts alike (native/rest_body.hpp)."""
    plain = parse_plain_locality(raw)
    if plain is None:
        return None
    model, packed, lora_name, cache_salt, pods = plain
    token_ids = array(TOKEN_TYPECODE)
    token_ids.frombytes(packed)
    return LocalityQuery(
        model=model,
        token_ids=token_ids,
        lora_name=lora_name,
        cache_salt=cache_salt,
        pods=pods,
    )


async def _read_query(request: Request) -> LocalityQuery:
    raw = await request.body()
    query = _plain_query(raw)
    if query is not None:
        return query
    if not raw.strip():
        raise InvalidQuery('request body is empty: send a JSON object such as {"model": ...}')
    try:
        body = LocalityRequest.model_validate_json(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from None
    return LocalityQuery(
        model=body.model,
        token_ids=body.token_ids,
        block_hashes=body.block_hashes,
        prompt=body.prompt,
        messages=body.messages,
        tools=body.tools,
        lora_name=body.lora_name,
        cache_salt=body.cache_salt,
        pods=body.pods,
    )


def _parse_prefix(prefix: str) -> list[int]:
    """``"H1,H2"`` -> [H1, H2]; an empty string is an empty chain."""
    if not prefix:
        return []
    hashes = []
    for position, item in enumerate(prefix.split(",")):
        text = item.strip()
        # isdigit() alone admits non-ASCII digits; the length check keeps int() cheap.
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_HASH_DIGITS):
            raise InvalidQuery(
                f"prefix item {position} ({item[:40]!r}) is not a decimal block hash"
            )
        value = int(text)
        if value >= 1 << 64:
            raise InvalidQuery(f"prefix item {position} ({item!r}) exceeds 2**64 - 1")
        hashes.append(value)
    return hashes


def _locality_json(answer: LocalityAnswer) -> dict[str, Any]:
    locality = answer.locality
    block_size = answer.block_size or 0
    return {
        "model": answer.model,
        "block_size": answer.block_size,
        "total_blocks": locality.total_blocks,
        "cache_hits": locality.cache_hits,
        "coverage": locality.coverage,
        "pods": [
            {
                "pod_id": p.pod.pod_id,
                "dp_rank": p.pod.dp_rank,
                "match_length": p.match_length,
                "matched_tokens": p.match_length * block_size,
                "block_count": p.block_count,
                "tiers": {t: n for t in ("gpu", "cpu", "disk") if (n := p.tiers.get(t))},
                "score": p.score,
            }
            for p in locality.pods
        ],
    }


def _version() -> str:
    try:
        return version("kv-cache")
    except PackageNotFoundError:
        return "0+unknown"


def _error(status: int, detail: str, **extra: object) -> JSONResponse:
    return _Json({"detail": detail, **extra}, status_code=status)


async def _on_query_error(request: Request, error: Exception) -> Response:
    status = next((s for cls, s in _STATUS_OF.items() if isinstance(error, cls)), 400)
    return _error(status, str(error))


async def _on_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = e.get("ctx", {}).get("error") or e.get("msg", "")
            return _error(400, f"request body is not valid JSON: {reason}")
    listed = [
        {"loc": list(e.get("loc", ())), "msg": _message(e), "type": str(e.get("type", ""))}
        for e in errors[:_ERRORS_LISTED]
    ]
    detail = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in listed[:_ERRORS_SHOWN])
    if len(errors) > _ERRORS_SHOWN:
        detail += f" (and {len(errors) - _ERRORS_SHOWN} more)"
    return _error(422, detail, errors=listed)


def _message(error: dict[str, Any]) -> str:
    if error.get("type") == "extra_forbidden":
        return "unknown field"
    return str(error.get("msg", "invalid"))


def _field(loc: Sequence[Any]) -> str:
    """``["body", "token_ids", 3]`` -> ``token_ids[3]``."""
    parts = loc[1:] if loc and loc[0] in ("body", "query") else loc
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


class _LimitBody:
    """413 for a body over the limit, before the app sees any of it.

    The body is read here, counted as it streams in, and handed to the app whole.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body over api.max_body_bytes ({self.max_body_bytes} bytes)"
        await _error(413, detail)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _CatchAll:
    """A generic 500 for anything unexpected, logged with its traceback, never echoed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in a REST request", path=scope.get("path"))
            if started:
                raise
            await _error(500, "internal error; see the service log")(scope, receive, send)
