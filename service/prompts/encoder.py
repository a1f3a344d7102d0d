"""One model's prompt encoder: its tokenizer and chat templates (``PromptEncoders`` in
``encoders.py`` builds them on first use; this module, and the tokenizer and template
libraries it pulls in, load only then)."""

from __future__ import annotations

import asyncio
import threading
from array import array
from collections.abc import Mapping, Sequence

from service.errors import InvalidQuery, NotSupported
from service.prompts.messages import conversation, tool_schemas
from service.prompts.template import ChatTemplate, ChatTemplateError, select_template
from service.prompts.tokenizer import TextTokenizer

__all__ = ["INLINE_CHARS", "PromptEncoder"]

INLINE_CHARS = 4096
"""Characters tokenised on the event loop; beyond, in a worker thread."""


class PromptEncoder:
    """One model's tokenizer and chat templates."""

    def __init__(
        self,
        model: str,
        tokenizer: TextTokenizer,
        templates: str | Mapping[str, str] | None,
        *,
        inline_chars: int = INLINE_CHARS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._sources = templates
        self._compiled: dict[str, ChatTemplate] = {}
        self._compile_lock = threading.Lock()
        self._inline_chars = inline_chars

    async def prompt_ids(self, text: str) -> array[int]:
        """A completion prompt's ids (``/v1/completions``: special tokens added)."""
        _require_unicode(text, "prompt")
        tokenizer = self.tokenizer
        if not tokenizer.wraps:  # no store: the whole text, with the post-processor
            if len(text) <= self._inline_chars:
                return tokenizer.completion_ids(text)
            return await asyncio.to_thread(tokenizer.completion_ids, text)
        return tokenizer.completion_ids(text, await self._body_ids(text))

    async def chat_ids(
        self,
        messages: Sequence[Mapping[str, object]],
        tools: Sequence[Mapping[str, object]] | None = None,
    ) -> array[int]:
        """A chat's ids (``/v1/chat/completions``): rendered with the generation prompt,
        tokenised without adding special tokens."""
        return await self._body_ids(self.render(messages, tools))

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        tools: Sequence[Mapping[str, object]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat's prompt text. Raises ``InvalidQuery`` for malformed messages or tools,
        ``NotSupported`` without a template, for a template error or non-text content."""
        template = self._template(tools)
        schemas = None if tools is None else tool_schemas(tools)
        chat = conversation(messages, template.content_format)
        try:
            text = template.render(
                chat,
                tools=schemas,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.tokenizer.special_tokens,
            )
        except ChatTemplateError as error:
            raise NotSupported(f"chat template of model {self.model!r}: {error}") from None
        _require_unicode(text, "messages")
        return text

    def _template(self, tools: object | None) -> ChatTemplate:
        if self._sources is None:
            raise NotSupported(
                f"model {self.model!r} has no chat template (tokenizer_config.json"
                " chat_template, chat_template.jinja or models[].chat_template)"
            )
        try:
            source, name = select_template(self._sources, tools=tools)
        except ChatTemplateError as error:
            raise NotSupported(f"chat template of model {self.model!r}: {error}") from None
        key = name or ""
        with self._compile_lock:
            template = self._compiled.get(key)
            if template is None:
                try:
                    template = self._compiled[key] = ChatTemplate(source)
                except ChatTemplateError as error:
                    raise NotSupported(f"chat template of model {self.model!r} {error}") from None
        return template

    async def _body_ids(self, text: str) -> array[int]:
        tokenizer = self.tokenizer
        splice = tokenizer.lookup(text)
        if len(text) - splice.start <= self._inline_chars:
            return tokenizer.finish(splice)
        return await asyncio.to_thread(tokenizer.finish, splice)


def _require_unicode(text: str, what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidQuery(
            f"{what}: not valid Unicode (lone surrogate at character {error.start})"
        ) from None
