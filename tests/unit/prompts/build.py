"""Tokenizer files the tests make themselves: small tokenizers trained with ``tokenizers``
on a fixed corpus, in the layouts real models ship, and chat template fixtures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

Kind = Literal["llama3", "gpt2", "metaspace", "unigram", "wordpiece", "prepend"]
KINDS: tuple[Kind, ...] = ("llama3", "gpt2", "metaspace", "unigram", "wordpiece", "prepend")

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = [BOS, EOS, IM_START, IM_END]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "You are a helpful assistant. Answer the user's questions truthfully and briefly.",
    "Routing requests to the pod that already holds the prompt's prefix saves prefill time.",
    "A cache hit means fewer tokens to compute: 1024 tokens at 16 per block is 64 blocks.",
    "def score(pods, blocks):\n    return sorted(pods, key=lambda p: -p.hits)[:3]\n",
    "They'll say it's fine, we've seen it, I'm sure, you'd agree -- don't you think?",
    "Numbers like 3.14159, 2718, 42 and 1,000,000 appear now and then (sometimes [nested]).",
    "Naïve café owners in São Paulo serve crème brûlée; 東京 and 서울 are far away. 🙂👍",
    "Tabs\tand  double  spaces,\nnew lines\n\nand blank lines all show up in real prompts.",
    "system: be concise. user: what is the capital of France? assistant: Paris.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "The END. Goodbye, world!  See you tomorrow at 09:30 -- or maybe at 10:00?",
]

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "\n<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML template, Qwen-like: BOS, optional tools section, tool calls, generation prompt."""

PARTS_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}[{{ part.type }}]{{ part.text }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A template that loops over content parts (vLLM's "openai" content format)."""


@cache
def _trained(kind: Kind) -> str:
    """The ``tokenizer.json`` text of a small tokenizer of ``kind`` (trained once)."""
    tokenizer = _untrained(kind)
    corpus = CORPUS * 4
    if kind == "unigram":
        trainer: Any = trainers.UnigramTrainer(
            vocab_size=400,
            special_tokens=["<unk>", *SPECIALS],
            unk_token="<unk>",
            show_progress=False,
        )
    elif kind == "wordpiece":
        trainer = trainers.WordPieceTrainer(
            vocab_size=500,
            special_tokens=["[UNK]", "[CLS]", "[SEP]", *SPECIALS],
            show_progress=False,
        )
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet() if kind in ("llama3", "gpt2") else []
        trainer = trainers.BpeTrainer(
            vocab_size=700,
            special_tokens=SPECIALS,
            initial_alphabet=alphabet,
            show_progress=False,
        )
    tokenizer.train_from_iterator(corpus, trainer)
    if kind == "wordpiece":
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
    else:
        bos = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
        if kind == "llama3":
            tokenizer.post_processor = processors.Sequence(
                [processors.ByteLevel(trim_offsets=False), bos]
            )
        elif kind == "gpt2":
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
        else:
            tokenizer.post_processor = bos
    text: str = tokenizer.to_str()
    return text


def _untrained(kind: Kind) -> Tokenizer:
    if kind == "llama3":
        tokenizer = Tokenizer(models.BPE(ignore_merges=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "gpt2":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    elif kind in ("metaspace", "prepend"):
        tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        if kind == "metaspace":
            tokenizer.normalizer = normalizers.NFC()
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
            tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        else:  # the legacy Llama 2 layout: prepend and replace in the normaliser
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
            tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def tokenizer_json(kind: Kind = "llama3", *, rstrip_token: str | None = None) -> str:
    """The ``tokenizer.json`` text of a trained tokenizer of ``kind``; ``rstrip_token`` adds
    a special token that strips whitespace to its right (as Phi-3's do)."""
    text = _trained(kind)
    if rstrip_token is None:
        return text
    tokenizer = Tokenizer.from_str(text)
    tokenizer.add_special_tokens([AddedToken(rstrip_token, rstrip=True, special=True)])
    extended: str = tokenizer.to_str()
    return extended


def write_model(
    directory: Path,
    *,
    kind: Kind = "llama3",
    config: Mapping[str, Any] | None = None,
    template: str | list[dict[str, str]] | None = CHATML_TEMPLATE,
    jinja_file: str | None = None,
) -> Path:
    """A model directory: ``tokenizer.json``, ``tokenizer_config.json`` (BOS/EOS and the chat
    template unless ``config`` says otherwise) and optionally ``chat_template.jinja``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(kind), encoding="utf-8")
    settings: dict[str, Any] = {
        "bos_token": {"content": BOS, "__type": "AddedToken"},
        "eos_token": IM_END,
        "additional_special_tokens": [IM_START, IM_END],
    }
    if template is not None:
        settings["chat_template"] = template
    settings.update(config or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    if jinja_file is not None:
        (directory / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    return directory
