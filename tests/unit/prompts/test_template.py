"""Chat templates render as transformers' apply_chat_template does, in a sandbox, with
messages rebuilt as vLLM rebuilds them."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from service.errors import InvalidQuery, NotSupported
from service.prompts.messages import conversation, tool_schemas
from service.prompts.template import ChatTemplate, ChatTemplateError, select_template
from tests.unit.prompts.build import BOS, CHATML_TEMPLATE, PARTS_TEMPLATE

SPECIAL = {"bos_token": BOS, "eos_token": "<|im_end|>"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def render(
    source: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    template = ChatTemplate(source)
    return template.render(
        conversation(messages, template.content_format),
        tools=None if tools is None else tool_schemas(tools),
        add_generation_prompt=add_generation_prompt,
        special_tokens=SPECIAL,
    )


def test_chatml_with_and_without_the_generation_prompt() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = f"{BOS}<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    assert render(CHATML_TEMPLATE, chat) == expected + "<|im_start|>assistant\n"
    assert render(CHATML_TEMPLATE, chat, add_generation_prompt=False) == expected


def test_multi_part_text_is_joined_with_newlines_for_a_string_template() -> None:
    chat: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first"},
                "second",
                {"type": "input_text", "text": "third"},
                {"type": "text", "text": None},  # skipped, as vLLM does
            ],
        },
        {"role": "assistant", "content": None},
    ]
    assert ChatTemplate(CHATML_TEMPLATE).content_format == "string"
    assert render(CHATML_TEMPLATE, chat) == (
        f"{BOS}<|im_start|>user\nfirst\nsecond\nthird<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_looping_over_content_gets_text_parts() -> None:
    assert ChatTemplate(PARTS_TEMPLATE).content_format == "openai"
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
    ]
    assert render(PARTS_TEMPLATE, chat) == (
        "<|im_start|>user\n[text]plain<|im_end|>\n"
        "<|im_start|>user\n[text]a[text]b<|im_end|>\n"
        "<|im_start|>tool\nx\ny<|im_end|>\n"  # tool text is always joined
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("source", "content_format"),
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "string"),
        (
            "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages[1:] %}{% for p in m['content'] | list %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% set ms = messages %}{% for m in ms %}{% for p in m.content %}{% endfor %}"
            "{% endfor %}",
            "openai",
        ),
        ("{% for p in content %}{% endfor %}", "string"),
    ],
)
def test_content_format_is_detected_as_vllm_does(source: str, content_format: str) -> None:
    assert ChatTemplate(source).content_format == content_format


def test_tools_are_rendered_as_vllm_dumps_them_keeping_non_ascii() -> None:
    minimal = {"function": {"name": "now"}}
    text = render(CHATML_TEMPLATE, [{"role": "user", "content": "?"}], tools=[WEATHER, minimal])
    assert '{"type": "function", "function": {"name": "get_weather", "description": "Météo' in text
    assert (
        '{"type": "function", "function": {"name": "now", "description": null,'
        ' "parameters": null}}' in text
    )


def test_tool_call_arguments_are_parsed_from_json() -> None:
    call: dict[str, Any] = {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'},
    }
    bad = {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
    chat = [{"role": "assistant", "content": "", "tool_calls": [call, bad]}]
    text = render(CHATML_TEMPLATE, chat, add_generation_prompt=False)
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>' in text
    assert '<tool_call>{"name": "g", "arguments": {}}</tool_call>' in text
    assert call["function"]["arguments"] == '{"x": 1}'  # the caller's message is left alone


def test_messages_keep_only_what_vllm_keeps() -> None:
    chat = conversation(
        [
            {"role": "assistant", "content": "a", "reasoning": "r", "tool_calls": [], "x": 1},
            {"role": "tool", "content": "t", "tool_call_id": "c1", "name": "f"},
            {"role": "developer", "content": "d", "tools": [WEATHER]},
        ],
        "string",
    )
    assert chat == [
        {"role": "assistant", "content": "a", "reasoning": "r", "reasoning_content": "r"},
        {"role": "tool", "content": "t", "tool_call_id": "c1", "name": "f"},
        {"role": "developer", "content": "d", "tools": [WEATHER]},
    ]


def test_raise_exception_strftime_now_loopcontrols_and_generation_blocks() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        "|{{ strftime_now('%Y') }}"
        "{% if messages | length > 2 %}{{ raise_exception('too many: ' ~ messages | length) }}"
        "{% endif %}"
    )
    two = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert render(source, two) == f"one|{datetime.datetime.now().year}"
    with pytest.raises(ChatTemplateError, match=r"^too many: 3$"):
        render(source, [*two, {"role": "user", "content": "three"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_the_sandbox_refuses_unsafe_access_and_mutation(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(source, [{"role": "u", "content": "c"}])


def test_a_template_that_does_not_compile_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"does not compile: .*\(line 2\)"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")


def test_template_code_failing_on_the_data_is_a_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render("{{ messages[0].content + 1 }}", [{"role": "user", "content": "c"}])


def test_named_templates_pick_tool_use_when_tools_are_given() -> None:
    named = {"default": "D", "tool_use": "T"}
    assert select_template(named, tools=None) == ("D", "default")
    assert select_template(named, tools=[WEATHER]) == ("T", "tool_use")
    assert select_template("S", tools=[WEATHER]) == ("S", None)
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        select_template({"rag": "R"}, tools=None)


@pytest.mark.parametrize(
    ("messages", "error", "message"),
    [
        ([{"content": "no role"}], InvalidQuery, r"messages\[0\]\.role"),
        (["not an object"], InvalidQuery, r"messages\[0\] is not an object"),
        ([{"role": "user", "content": 5}], InvalidQuery, r"messages\[0\]\.content must be"),
        ([{"role": "user", "content": [{"text": "x"}]}], InvalidQuery, "has no 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], InvalidQuery, "string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            NotSupported,
            "'image_url' is not supported",
        ),
        ([{"role": "assistant", "tool_calls": [{"id": "x"}]}], InvalidQuery, "'function'"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[" * 50_000}}],
                }
            ],
            InvalidQuery,
            "nested too deeply",
        ),
    ],
)
def test_malformed_messages_say_what_is_wrong(
    messages: list[Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        conversation(messages, "string")


def test_malformed_tools_say_what_is_wrong() -> None:
    with pytest.raises(InvalidQuery, match=r"tools\[0\]"):
        tool_schemas([{"name": "f"}])
    with pytest.raises(InvalidQuery, match=r"tools\[0\]\.type"):
        tool_schemas([{"type": "retrieval", "function": {"name": "f"}}])
