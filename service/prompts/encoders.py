"""Per-model prompt encoders: text prompts and chats to the token ids vLLM would compute.

``PromptEncoders`` loads each model's tokenizer and chat template lazily, once, in a
thread (a real ``tokenizer.json`` takes 0.1-0.5 s to parse), and remembers a failure for
``retry_seconds`` so a missing tokenizer costs a few ``stat`` calls, not a load, per query.

Tokenising costs ~0.1-0.2 us per character (docs/performance.md, "Prompts"): the part of
a prompt the prefix store does not know is tokenised on the event loop up to
``inline_chars`` characters, and beyond in a worker thread (``encode_batch_fast`` releases
the GIL), so one long new prompt does not hold up the queries behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from service.errors import NotSupported
from service.prompts.locate import TokenizerNotFound, locate_tokenizer

if TYPE_CHECKING:
    from service.prompts.encoder import PromptEncoder

__all__ = ["DEFAULT_PREFIX_STORE_BYTES", "PromptEncoders", "PromptSpec"]

DEFAULT_PREFIX_STORE_BYTES: Final = 64 * 1024 * 1024
"""Prefix store bound per model when the model is not configured."""

_RETRY_SECONDS: Final = 30.0

log = structlog.get_logger("kv_cache.prompts")


class PromptSpec(Protocol):
    """What ``models[]`` says about a model's prompts (``ModelSettings`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> str | None: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def prefix_store_bytes(self) -> int: ...


class PromptEncoders:
    """Prompt encoders by model name, loaded on first use.

    A configured model's tokenizer is ``models[].tokenizer``, else its name; either may be a
    path or a hub id in the local Hugging Face cache. A model not configured may still be
    found in the cache under its name (never as a path: the name comes from the request).
    """

    def __init__(
        self,
        specs: Iterable[PromptSpec] = (),
        *,
        environ: Mapping[str, str] | None = None,
        default_store_bytes: int = DEFAULT_PREFIX_STORE_BYTES,
        retry_seconds: float = _RETRY_SECONDS,
        inline_chars: int | None = None,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._environ = os.environ if environ is None else environ
        self._default_store_bytes = default_store_bytes
        self._retry_seconds = retry_seconds
        self._inline_chars = inline_chars
        self._lock = threading.Lock()
        self._loads: dict[
            str, tuple[concurrent.futures.Future[PromptEncoder | NotSupported], float]
        ] = {}

    async def get(self, model: str) -> PromptEncoder:
        """The encoder of ``model``; raises ``NotSupported`` saying what is missing."""
        now = time.monotonic()
        with self._lock:
            entry = self._loads.get(model)
            start = entry is None or (
                entry[0].done()
                and isinstance(entry[0].result(), NotSupported)
                and now - entry[1] >= self._retry_seconds
            )
            if start:
                future: concurrent.futures.Future[PromptEncoder | NotSupported]
                future = concurrent.futures.Future()
                self._loads[model] = (future, now)
            else:
                assert entry is not None
                future = entry[0]
        if start:
            await asyncio.to_thread(self._load_into, model, future)
        outcome = await asyncio.wrap_future(future)
        if isinstance(outcome, NotSupported):
            # A new exception each time: re-raising one object would grow its traceback.
            raise NotSupported(str(outcome))
        return outcome

    def _load_into(
        self, model: str, future: concurrent.futures.Future[PromptEncoder | NotSupported]
    ) -> None:
        try:
            future.set_result(self.load(model))
            return
        except NotSupported as error:
            failure = error
        except Exception:  # a bug: logged, reported without internals
            log.exception("tokenizer load failed", model=model)
            failure = NotSupported(f"model {model!r}: tokenizer failed to load")
        future.set_result(failure)
        if model in self._specs:
            log.warning("tokenizer unavailable", model=model, reason=str(failure))
        else:
            # Names from requests are unbounded: only a success is remembered for them.
            with self._lock:
                if self._loads.get(model, (None, 0.0))[0] is future:
                    del self._loads[model]

    def load(self, model: str) -> PromptEncoder:
        """Loads ``model``'s encoder now, in this thread. Raises ``NotSupported``."""
        # Imported on the first prompt query: tokenizers and jinja2 cost ~5 MiB of RSS that
        # a service answering token ids never needs.
        from service.prompts.encoder import INLINE_CHARS, PromptEncoder
        from service.prompts.tokenizer import TextTokenizer, TokenizerFileError

        spec = self._specs.get(model)
        name = spec.tokenizer if spec is not None and spec.tokenizer else model
        try:
            # A name from a request is never read as a path.
            files = locate_tokenizer(name, local=spec is not None, environ=self._environ)
        except TokenizerNotFound as error:
            raise NotSupported(_not_found(model, spec, error)) from None
        store_bytes = spec.prefix_store_bytes if spec is not None else self._default_store_bytes
        started = time.perf_counter()
        try:
            tokenizer = TextTokenizer.from_files(files, store_bytes=store_bytes)
            templates = _templates(files.directory, tokenizer.config, spec)
        except (TokenizerFileError, _TemplateFileError) as error:
            raise NotSupported(f"model {model!r}: cannot use its tokenizer: {error}") from None
        log.info(
            "tokenizer loaded",
            model=model,
            path=str(files.tokenizer_json),
            seconds=round(time.perf_counter() - started, 3),
            chat_template=templates is not None,
            prefix_store=tokenizer.hazard or "on",
        )
        inline_chars = INLINE_CHARS if self._inline_chars is None else self._inline_chars
        return PromptEncoder(model, tokenizer, templates, inline_chars=inline_chars)


def _not_found(model: str, spec: PromptSpec | None, error: TokenizerNotFound) -> str:
    tried = "; ".join(error.tried) or "nothing (not a path or hub id)"
    if spec is None or not spec.tokenizer:
        return (
            f"model {model!r} has no tokenizer configured (models[].tokenizer) and none was"
            f" found under its name; tried {tried}. Send token_ids, or set models[].tokenizer"
            " to a tokenizer.json, its directory, or a hub id in the local Hugging Face cache"
        )
    return (
        f"model {model!r}: tokenizer {spec.tokenizer!r} not found; tried {tried}."
        " Hub ids are only looked up in the local Hugging Face cache (nothing is downloaded)"
    )


class _TemplateFileError(Exception):
    """A configured chat template file cannot be read."""


def _templates(
    directory: Path, config: Mapping[str, Any], spec: PromptSpec | None
) -> str | dict[str, str] | None:
    """The chat template(s): ``models[].chat_template``, else ``chat_template.jinja`` beside
    the tokenizer, else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
    ``{"name", "template"}``), as transformers and vLLM's ``--chat-template`` order them."""
    override = spec.chat_template if spec is not None else None
    if override:
        path = Path(override).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _TemplateFileError(f"models[].chat_template {override!r}: {error}") from None
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _TemplateFileError(f"{jinja_file}: {error}") from None
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            item["name"]: item["template"]
            for item in value
            if isinstance(item, Mapping)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        }
        return named or None
    return None
