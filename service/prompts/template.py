"""Chat templates, rendered in a sandbox the way transformers' ``apply_chat_template`` does.

The environment is transformers' (``utils/chat_template_utils.py``): an
``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension and a ``{% generation %}`` block, a ``tojson`` filter that keeps
non-ASCII text as it is, and the globals ``raise_exception`` and ``strftime_now``. A template
sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the special tokens
(``bos_token``, ``eos_token``, ...).

``content_format`` says how a template reads message content, detected as vLLM does: a
template that loops over ``message['content']`` gets a list of ``{"type": "text", ...}``
parts (``"openai"``), any other one a string (``"string"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

__all__ = ["ChatTemplate", "ChatTemplateError", "ContentFormat", "select_template"]

ContentFormat = Literal["string", "openai"]


class ChatTemplateError(Exception):
    """A template that does not compile or fails to render; the message is jinja's, or the
    template's own ``raise_exception`` text."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it
    (for training masks); rendering just keeps the body."""

    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API declares it so

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> Any:
        return caller()


def _raise_exception(message: object) -> NoReturn:
    raise jinja2.TemplateError(str(message))


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: jinja's own escapes HTML and always sorts keys.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class ChatTemplate:
    """One compiled chat template. Rendering is thread-safe."""

    def __init__(self, source: str) -> None:
        """Compiles ``source``; raises ``ChatTemplateError`` with jinja's message."""
        environment = _environment()
        try:
            self._template = environment.from_string(source)
            tree = environment.parse(source)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"does not compile: {_describe(error)}") from None
        self.source = source
        self.content_format: ContentFormat = "openai" if any(_content_loops(tree)) else "string"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, object] | None = None,
    ) -> str:
        """The prompt text for ``messages``; raises ``ChatTemplateError``."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **(special_tokens or {}),
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(_describe(error)) from None
        except Exception as error:
            # Template code failing on the data (e.g. adding a string to a list), as
            # vLLM reports any failure of apply_chat_template to the caller.
            raise ChatTemplateError(f"{type(error).__name__}: {error}") from None


def select_template(
    templates: str | Mapping[str, str], *, tools: object | None
) -> tuple[str, str | None]:
    """The template to use and its name: ``tool_use`` when tools are given and a template of
    that name exists, else ``default``, as transformers picks among named templates."""
    if isinstance(templates, str):
        return templates, None
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"], "tool_use"
    if "default" in templates:
        return templates["default"], "default"
    names = ", ".join(sorted(templates)) or "none"
    raise ChatTemplateError(f"several chat templates ({names}) and none named 'default'")


def _describe(error: jinja2.TemplateError) -> str:
    message = error.message or type(error).__name__
    line = getattr(error, "lineno", None)
    return f"{message} (line {line})" if isinstance(error, jinja2.TemplateSyntaxError) else message


# --- content format detection (after vLLM's renderers/hf.py) ----------------------------


def _loads(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _key_of(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _loads(node.node, name)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
    return isinstance(node, jinja2.nodes.Getattr) and _loads(node.node, name) and node.attr == key


def _reads(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """``name`` (or ``name[key]``), possibly filtered, tested or sliced."""
    if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _reads(node.node, name, key)
    return _key_of(node, name, key) if key else _loads(node, name)


def _aliases(tree: jinja2.nodes.Template, name: str) -> list[str]:
    """``name`` and every variable assigned from it (``{% set msgs = messages %}``)."""
    found = [name]
    pending = [name]
    while pending:
        current = pending.pop()
        for assign in tree.find_all(jinja2.nodes.Assign):
            target = assign.target
            if (
                _reads(assign.node, current)
                and isinstance(target, jinja2.nodes.Name)
                and target.name not in found
            ):
                found.append(target.name)
                pending.append(target.name)
    return found


def _loop_targets(tree: jinja2.nodes.Template, sources: list[str], key: str | None) -> list[str]:
    targets = []
    for loop in tree.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(
            _reads(loop.iter, source, key) for source in sources
        ):
            targets.append(loop.target.name)
    return targets


def _content_loops(tree: jinja2.nodes.Template) -> Iterator[str]:
    """Loop variables over a message's content: ``{% for part in message['content'] %}``."""
    messages = _loop_targets(tree, _aliases(tree, "messages"), None)
    yield from _loop_targets(tree, messages, "content")
