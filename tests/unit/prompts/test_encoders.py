"""PromptEncoders: lazy per-model loading, errors naming the model and the paths tried,
chat templates from the config, the jinja file or an override; inline or threaded."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tokenizers import Tokenizer

from service.errors import InvalidQuery, NotSupported
from service.prompts import PromptEncoders
from service.prompts.encoder import PromptEncoder
from tests.unit.prompts.build import BOS, CORPUS, tokenizer_json, write_model

T = TypeVar("T")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
RENDERED = (
    f"{BOS}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
LONG = " ".join(CORPUS * 3)


@dataclass(frozen=True)
class Spec:
    """A ``models[]`` entry: ModelSettings' prompt fields."""

    name: str
    tokenizer: str | None = None
    chat_template: str | None = None
    prefix_store_bytes: int = 1 << 20


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def encoders(
    *specs: Spec, hub: Path | None = None, retry_seconds: float = 30.0, inline_chars: int = 2048
) -> PromptEncoders:
    environ = {"HF_HUB_CACHE": str(hub) if hub is not None else "/nonexistent/hub"}
    return PromptEncoders(
        specs, environ=environ, retry_seconds=retry_seconds, inline_chars=inline_chars
    )


def failure(prompts: PromptEncoders, model: str) -> str:
    with pytest.raises(NotSupported) as caught:
        run(prompts.get(model))
    return str(caught.value)


@pytest.mark.parametrize("inline_chars", [0, 1 << 20])
def test_prompts_and_chats_get_the_ids_vllm_computes(tmp_path: Path, inline_chars: int) -> None:
    directory = write_model(tmp_path / "m")
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompts = encoders(Spec("m", str(directory)), inline_chars=inline_chars)

    async def scenario() -> None:
        encoder = await prompts.get("m")
        assert encoder.render(CHAT) == RENDERED
        chat = await encoder.chat_ids(CHAT)
        assert chat.tolist() == reference.encode(RENDERED, add_special_tokens=False).ids
        for text in (LONG, LONG + " and a new ending", "short"):
            assert (await encoder.prompt_ids(text)).tolist() == reference.encode(text).ids

    run(scenario())


def test_a_model_is_loaded_once_however_many_ask(tmp_path: Path) -> None:
    loads: list[str] = []

    class Counting(PromptEncoders):
        def load(self, model: str) -> PromptEncoder:
            loads.append(model)
            return super().load(model)

    directory = write_model(tmp_path / "m")
    prompts = Counting([Spec("m", str(directory))], environ={})

    async def scenario() -> list[PromptEncoder]:
        return await asyncio.gather(*(prompts.get("m") for _ in range(8)))

    got = run(scenario())
    assert all(encoder is got[0] for encoder in got)
    assert run(prompts.get("m")) is got[0]
    assert loads == ["m"]


def test_a_model_without_a_tokenizer_names_the_paths_tried(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    message = failure(encoders(hub=hub), "org/model")
    assert message.startswith("model 'org/model' has no tokenizer configured (models[].tokenizer)")
    assert str(hub / "models--org--model" / "snapshots" / "*" / "tokenizer.json") in message
    missing = tmp_path / "nowhere"
    message = failure(encoders(Spec("m", str(missing)), hub=hub), "m")
    assert f"model 'm': tokenizer {str(missing)!r} not found; tried {missing}" in message


def test_a_model_found_in_the_hub_cache_under_its_name(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    write_model(hub / "models--org--model" / "snapshots" / "abc")
    encoder = run(encoders(hub=hub).get("org/model"))
    assert encoder.render(CHAT) == RENDERED


def test_a_requested_name_is_never_read_as_a_path(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    assert "no tokenizer configured" in failure(encoders(hub=tmp_path), str(directory))


def test_a_failure_is_remembered_then_retried(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    remembered = encoders(Spec("m", str(directory)), retry_seconds=3600)
    retried = encoders(Spec("m", str(directory)), retry_seconds=0)
    failure(remembered, "m")
    failure(retried, "m")
    write_model(directory)
    failure(remembered, "m")
    assert run(retried.get("m")).model == "m"


def test_a_broken_tokenizer_file_is_named(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    (directory / "tokenizer.json").write_text('{"model": {"type": "Nope"}}', encoding="utf-8")
    message = failure(encoders(Spec("m", str(directory))), "m")
    assert message.startswith(f"model 'm': cannot use its tokenizer: {directory}/tokenizer.json")


def test_chat_template_jinja_beats_the_config_and_the_override_beats_both(
    tmp_path: Path,
) -> None:
    directory = write_model(tmp_path / "m", jinja_file="J{{ messages[0].content }}")
    override = tmp_path / "override.jinja"
    override.write_text("O{{ messages[0].content }}", encoding="utf-8")
    plain = run(encoders(Spec("m", str(directory))).get("m"))
    assert plain.render(CHAT) == "J" + CHAT[0]["content"]
    overridden = run(encoders(Spec("m", str(directory), str(override))).get("m"))
    assert overridden.render(CHAT) == "O" + CHAT[0]["content"]
    message = failure(encoders(Spec("m", str(directory), str(tmp_path / "none.jinja"))), "m")
    assert "models[].chat_template" in message and "none.jinja" in message


def test_named_templates_in_the_config(tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    encoder = run(encoders(Spec("m", str(write_model(tmp_path / "m", template=named)))).get("m"))
    assert encoder.render(CHAT) == "D"
    tool = {"type": "function", "function": {"name": "f"}}
    assert encoder.render(CHAT, [tool]) == "T"


def test_template_problems_are_not_supported_with_the_templates_message(tmp_path: Path) -> None:
    def encoder(template: str | None) -> PromptEncoder:
        directory = write_model(tmp_path / str(len(list(tmp_path.iterdir()))), template=template)
        return run(encoders(Spec("m", str(directory))).get("m"))

    with pytest.raises(NotSupported, match=r"^model 'm' has no chat template"):
        encoder(None).render(CHAT)
    with pytest.raises(NotSupported, match=r"^chat template of model 'm': Unknown role: robot$"):
        encoder(
            "{% if messages[0].role == 'robot' %}"
            "{{ raise_exception('Unknown role: ' + messages[0].role) }}{% endif %}"
        ).render([{"role": "robot", "content": "beep"}])
    with pytest.raises(NotSupported, match=r"^chat template of model 'm' does not compile"):
        encoder("{% for %}").render(CHAT)


def test_text_that_is_not_unicode_is_invalid(tmp_path: Path) -> None:
    encoder = run(encoders(Spec("m", str(write_model(tmp_path / "m")))).get("m"))
    with pytest.raises(InvalidQuery, match="lone surrogate at character 2"):
        run(encoder.prompt_ids("ab\ud800"))
    with pytest.raises(InvalidQuery, match=r"^messages: "):
        run(encoder.chat_ids([{"role": "user", "content": "\udfff"}]))


def test_a_tokenizer_kept_from_the_store_still_tokenises_exactly(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m", kind="prepend")
    reference = Tokenizer.from_str(tokenizer_json("prepend"))
    encoder = run(encoders(Spec("m", str(directory)), inline_chars=0).get("m"))
    assert encoder.tokenizer.store is None
    assert run(encoder.prompt_ids(LONG)).tolist() == reference.encode(LONG).ids


def test_a_model_only_named_by_requests_is_looked_up_again_at_once(tmp_path: Path) -> None:
    """Failures are remembered for configured models only: request names are unbounded."""
    hub = tmp_path / "hub"
    prompts = encoders(hub=hub, retry_seconds=3600)
    failure(prompts, "org/late")
    write_model(hub / "models--org--late" / "snapshots" / "abc")
    assert run(prompts.get("org/late")).model == "org/late"
