"""TextTokenizer tokenises as vLLM does: completions with the post-processor's special
tokens (or the config's add_bos_token/add_eos_token), chats without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from service.prompts.locate import TokenizerFiles
from service.prompts.tokenizer import TextTokenizer, TokenizerFileError
from tests.unit.prompts.build import BOS, CORPUS, IM_END, IM_START, tokenizer_json, write_model

TEXT = "You are a helpful assistant. Naïve café, 東京 🙂 -- 1234 tokens!"


def test_completion_ids_carry_the_bos_the_post_processor_adds() -> None:
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 20)
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    ids = tokenizer.completion_ids(TEXT).tolist()
    assert ids == reference.encode(TEXT, add_special_tokens=True).ids
    assert ids[0] == reference.token_to_id(BOS)
    assert ids[1:] == tokenizer.body_ids(TEXT).tolist()


def test_byte_level_ids_decode_back_to_the_text() -> None:
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 20, stride=16)
    for text in (TEXT, *CORPUS, " ".join(CORPUS)):
        assert reference.decode(tokenizer.body_ids(text).tolist()) == text
        assert reference.decode(tokenizer.completion_ids(text).tolist()) == text  # BOS skipped


def test_a_tokenizer_without_special_tokens_adds_none() -> None:
    tokenizer = TextTokenizer(tokenizer_json("gpt2"), {}, store_bytes=1 << 20)
    assert tokenizer.completion_ids(TEXT).tolist() == tokenizer.body_ids(TEXT).tolist()


def test_add_bos_token_and_add_eos_token_in_the_config_override_the_post_processor() -> None:
    reference = Tokenizer.from_str(tokenizer_json("gpt2"))
    bos, eos = reference.token_to_id(BOS), reference.token_to_id(IM_END)
    body = reference.encode(TEXT, add_special_tokens=False).ids
    config = {"bos_token": BOS, "eos_token": IM_END}
    both = TextTokenizer(
        tokenizer_json("gpt2"),
        {**config, "add_bos_token": True, "add_eos_token": True},
        store_bytes=1 << 20,
    )
    assert both.completion_ids(TEXT).tolist() == [bos, *body, eos]
    neither = TextTokenizer(
        tokenizer_json("llama3"), {**config, "add_bos_token": False}, store_bytes=1 << 20
    )
    llama3 = Tokenizer.from_str(tokenizer_json("llama3"))
    assert (
        neither.completion_ids(TEXT).tolist() == llama3.encode(TEXT, add_special_tokens=False).ids
    )


def test_special_tokens_for_templates_come_from_the_config() -> None:
    config = {
        "bos_token": {"content": BOS, "__type": "AddedToken"},
        "eos_token": IM_END,
        "pad_token": None,
        "additional_special_tokens": [IM_START, {"content": IM_END}],
    }
    tokenizer = TextTokenizer(tokenizer_json("llama3"), config, store_bytes=0)
    assert tokenizer.special_tokens == {
        "bos_token": BOS,
        "eos_token": IM_END,
        "additional_special_tokens": [IM_START, IM_END],
    }


def test_special_token_text_in_a_prompt_is_the_special_token() -> None:
    """As in vLLM (and transformers), special tokens written in the text are recognised."""
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 20, stride=4)
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    text = f"{IM_START}user hello there{IM_END} and more words after it"
    assert reference.token_to_id(IM_START) in tokenizer.body_ids(text).tolist()
    assert tokenizer.body_ids(text).tolist() == reference.encode(text, add_special_tokens=False).ids


def test_files_are_read_from_the_model_directory(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    files = TokenizerFiles(directory / "tokenizer.json", directory)
    tokenizer = TextTokenizer.from_files(files, store_bytes=1 << 20)
    assert tokenizer.special_tokens["bos_token"] == BOS
    assert "chat_template" in tokenizer.config


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    (directory / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    files = TokenizerFiles(directory / "tokenizer.json", directory)
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json"):
        TextTokenizer.from_files(files, store_bytes=0)
    (directory / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["type"] = "Nonsense"
    (directory / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"m/tokenizer\.json"):
        TextTokenizer.from_files(files, store_bytes=0)


class _CutsInsideWords:
    """A broken cut rule: checkpoints every 5 characters, inside words."""

    def checkpoints(self, text: str, stride: int, after: int = 0, *, min_gap: int = 1) -> list[int]:
        return list(range(after + 5, len(text) - 1, 5))

    def next_checkpoint(
        self, text: str, stride: int, after: int = 0, *, min_gap: int = 1
    ) -> int | None:
        return after + 5 if after + 5 < len(text) - 1 else None


def test_a_splice_that_changes_the_ids_turns_the_store_off_and_the_ids_stay_exact() -> None:
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 20)
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    assert tokenizer.store is not None
    tokenizer.store._rule = _CutsInsideWords()  # type: ignore[assignment]
    text = " ".join(CORPUS)
    assert tokenizer.body_ids(text).tolist() == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.store is None
    assert tokenizer.hazard is not None and "differed" in tokenizer.hazard
    assert tokenizer.body_ids(text).tolist() == reference.encode(text, add_special_tokens=False).ids
