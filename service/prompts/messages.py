"""Chat messages and tools as vLLM hands them to a chat template.

vLLM (``entrypoints/chat_utils.py``, ``parse_chat_messages``) rebuilds every message before
rendering: text parts (``text``, ``input_text``, ``output_text``, ``refusal``,
``thinking``) are joined with newlines for a ``"string"`` template or kept as
``{"type": "text", "text": ...}`` parts for an ``"openai"`` one; a tool message's text parts
are always joined; only ``role``, ``content``, ``name``, ``tool_calls`` (assistant, with
JSON ``arguments`` parsed), ``tool_call_id`` (tool), ``reasoning`` (assistant), ``tools``
(developer) and ``task`` are kept. Tools are dumped as its pydantic models dump them.
Rendering the same structures is what makes the prompt, and so its tokens, the same.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from service.errors import InvalidQuery, NotSupported
from service.prompts.template import ContentFormat

__all__ = ["conversation", "tool_schemas"]

_TEXT_KEYS: Final = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def conversation(
    messages: Sequence[Mapping[str, object]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The messages a template renders. Raises ``InvalidQuery`` for malformed messages and
    ``NotSupported`` for content that is not text (images, audio, ...)."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidQuery("messages must be a list of objects")
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidQuery(f"{where} is not an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidQuery(f"{where}.role must be a non-empty string")
        texts = _texts(message.get("content"), f"{where}.content")
        content: str | list[dict[str, str]]
        if content_format == "openai" and role != "tool":
            content = [{"type": "text", "text": text} for text in texts]
        else:
            content = "\n".join(texts)
        rebuilt: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                calls = _tool_calls(tool_calls, f"{where}.tool_calls")
                if calls:
                    rebuilt["tool_calls"] = calls
            reasoning = message.get("reasoning")
            if reasoning is not None:
                rebuilt["reasoning"] = reasoning
                rebuilt["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            rebuilt["tool_call_id"] = message["tool_call_id"]
        for key in ("name", "task"):
            if isinstance(message.get(key), str):
                rebuilt[key] = message[key]
        if role == "developer":
            rebuilt["tools"] = copy.deepcopy(message.get("tools"))
        result.append(rebuilt)
    return result


def tool_schemas(tools: Sequence[Mapping[str, object]]) -> list[dict[str, Any]]:
    """Tools as vLLM's ``ChatCompletionToolsParam.model_dump()`` gives them to a template:
    ``type`` defaults to ``"function"``, a function's ``description`` and ``parameters`` to
    null; other keys are kept, after the declared ones. Raises ``InvalidQuery``."""
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise InvalidQuery("tools must be a list of objects")
    schemas = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or not isinstance(function, Mapping):
            raise InvalidQuery(f"{where} must be an object with a 'function' object")
        if not isinstance(function.get("name"), str):
            raise InvalidQuery(f"{where}.function.name must be a string")
        if tool.get("type", "function") != "function":
            raise InvalidQuery(f"{where}.type must be 'function'")
        declared = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": copy.deepcopy(function.get("parameters")),
        }
        extra = {k: copy.deepcopy(v) for k, v in function.items() if k not in declared}
        others = {k: copy.deepcopy(v) for k, v in tool.items() if k not in ("type", "function")}
        schemas.append({"type": "function", "function": {**declared, **extra}, **others})
    return schemas


def _texts(content: object, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise InvalidQuery(f"{where} must be a string, a list of parts or null")
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise InvalidQuery(f"{where}[{index}] is not a string or an object")
        kind = part.get("type")
        if kind is None:
            raise InvalidQuery(f"{where}[{index}] has no 'type'")
        key = _TEXT_KEYS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise NotSupported(
                f"{where}[{index}]: content of type {kind!r} is not supported;"
                " only text parts can be tokenised"
            )
        text = part.get(key)
        if text is None:
            continue  # vLLM skips a text part without text
        if not isinstance(text, str):
            raise InvalidQuery(f"{where}[{index}].{key} must be a string")
        texts.append(text)
    return texts


def _tool_calls(tool_calls: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str | bytes):
        raise InvalidQuery(f"{where} must be a list")
    calls = []
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(call, Mapping) or not isinstance(function, Mapping):
            raise InvalidQuery(f"{where}[{index}] must be an object with a 'function' object")
        try:
            rebuilt = copy.deepcopy(dict(call))
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                # Templates expect arguments as a dict; vLLM parses them, {} when not JSON.
                try:
                    parsed: object = json.loads(arguments)
                except json.JSONDecodeError:
                    parsed = {}
            elif isinstance(arguments, dict | list):
                parsed = copy.deepcopy(arguments)
            else:
                parsed = {}
            rebuilt["function"] = {**copy.deepcopy(dict(function)), "arguments": parsed}
        except RecursionError:
            raise InvalidQuery(f"{where}[{index}] is nested too deeply") from None
        calls.append(rebuilt)
    return calls
