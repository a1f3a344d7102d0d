"""A model's Hugging Face tokenizer, tokenising text exactly as vLLM does.

- Completion prompts (``/v1/completions``): ``add_special_tokens=True``, so the special
  tokens the tokenizer's post-processor puts around a text (e.g. BOS), with
  ``tokenizer_config.json``'s ``add_bos_token``/``add_eos_token``, when set, overriding it
  as transformers' tokenizers do.
- Rendered chats (``/v1/chat/completions``): ``add_special_tokens=False``; the template
  writes its own BOS.

The text between the special tokens (the *body*) goes through a ``PrefixStore`` when the
tokenizer passes ``splice_hazard``; otherwise it is tokenised whole every time.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import structlog
from tokenizers import Tokenizer

from service.prompts.boundaries import CutRule, splice_hazard
from service.prompts.locate import TokenizerFiles
from service.prompts.prefix_store import TOKEN_TYPECODE, PrefixStore, Splice

__all__ = ["SPECIAL_TOKEN_NAMES", "TextTokenizer", "TokenizerFileError"]

SPECIAL_TOKEN_NAMES: Final = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""``tokenizer_config.json`` keys that chat templates see as variables, as in transformers."""

_WRAPPER_PROBES: Final = ("a", "Hello, world!", "x y 1 2 ...")
# Live checks of the splice property (``TextTokenizer._due_for_check``).
_CHECK_FIRST: Final = 16
_CHECK_EVERY: Final = 1000

_log = structlog.get_logger("kv_cache.prompts")

_Wrapper = tuple[tuple[int, ...], tuple[int, ...]]


class TokenizerFileError(Exception):
    """A tokenizer file exists but cannot be read or parsed."""


class TextTokenizer:
    """Token ids of completion prompts and rendered chats for one model. Thread-safe."""

    def __init__(
        self,
        tokenizer_json: str,
        config: Mapping[str, Any],
        *,
        store_bytes: int,
        stride: int = 512,
    ) -> None:
        """``tokenizer_json`` is the text of ``tokenizer.json``, ``config`` the parsed
        ``tokenizer_config.json`` (empty when absent); ``store_bytes`` bounds the prefix
        store (0: none). Raises ``ValueError`` for a file ``tokenizers`` cannot load."""
        spec = json.loads(tokenizer_json)
        if not isinstance(spec, dict):
            raise ValueError(f"expected a JSON object, got {type(spec).__name__}")
        try:
            body = Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # the Rust side raises plain Exceptions
            raise ValueError(str(error)) from error
        self._config = config
        self.special_tokens: Mapping[str, str | list[str]] = _special_tokens(config)
        """``bos_token``, ``eos_token``, ... and ``additional_special_tokens`` as strings."""
        self._wrapper = _wrapper(body, config, self.special_tokens)
        # Kept only when the post-processor is not a fixed wrapper (not seen in practice).
        self._full = Tokenizer.from_str(tokenizer_json) if self._wrapper is None else None
        # The body needs no post-processor: it adds nothing without special tokens.
        body.post_processor = None
        self._body = body
        rule = CutRule.of(spec)
        self.hazard = splice_hazard(body, spec, rule) if store_bytes > 0 else "disabled"
        """Why the prefix store is not used, or None when it is."""
        self.store = PrefixStore(store_bytes, rule, stride=stride) if self.hazard is None else None
        self._finished = 0  # finish() calls that cut their rest into pieces

    @classmethod
    def from_files(cls, files: TokenizerFiles, *, store_bytes: int) -> TextTokenizer:
        """Reads ``tokenizer.json`` and, beside it, ``tokenizer_config.json`` if present.

        Raises ``TokenizerFileError`` naming the file that cannot be used.
        """
        try:
            text = files.tokenizer_json.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerFileError(f"{files.tokenizer_json}: {error}") from error
        config = _read_json(files.config_json) if files.config_json.is_file() else {}
        try:
            return cls(text, config, store_bytes=store_bytes)
        except ValueError as error:
            raise TokenizerFileError(f"{files.tokenizer_json}: {error}") from error

    @property
    def config(self) -> Mapping[str, Any]:
        """``tokenizer_config.json`` as read (empty when absent)."""
        return self._config

    def lookup(self, text: str) -> Splice:
        """The ids of the longest stored prefix of ``text``; cheap enough for the event loop."""
        if self.store is None:
            return Splice(text, 0, array(TOKEN_TYPECODE))
        return self.store.lookup(text)

    def finish(self, splice: Splice) -> array[int]:
        """The body ids of ``splice.text``: the known prefix's plus those of the rest.
        Consumes ``splice`` (its ``ids`` become the result).

        The rest is tokenised as pieces cut at its checkpoints (safe cuts, so the pieces'
        ids concatenate to the rest's), in one ``encode_batch_fast`` call: the pieces are
        tokenised in parallel, without the offsets ``encode`` computes, and with the GIL
        released; each piece that ends at a checkpoint becomes a store segment as is.
        """
        text = splice.text
        ids = splice.ids
        if splice.start >= len(text):
            return ids
        bounds = [splice.start, *splice.rest_cuts, len(text)]
        pieces = [text[begin:end] for begin, end in pairwise(bounds)]
        encodings = self._body.encode_batch_fast(pieces, add_special_tokens=False)
        piece_ids = [encoding.ids for encoding in encodings]
        if len(piece_ids) > 1 and self._due_for_check():
            whole = self._body.encode_batch_fast([text[splice.start :]], add_special_tokens=False)
            if [i for piece in piece_ids for i in piece] != whole[0].ids:
                self._splice_failed(text)
                ids.fromlist(whole[0].ids)
                return ids
        if self.store is not None and len(piece_ids) > 1:
            self.store.store(splice, piece_ids[:-1])
        for piece in piece_ids:
            ids.fromlist(piece)
        return ids

    def _due_for_check(self) -> bool:
        """Whether this call should also tokenise its rest whole, as a live check of the
        splice property: the first ``_CHECK_FIRST`` calls, then one in ``_CHECK_EVERY``."""
        self._finished += 1
        return self._finished <= _CHECK_FIRST or self._finished % _CHECK_EVERY == 0

    def _splice_failed(self, text: str) -> None:
        """Pieces cut at checkpoints did not tokenise as the whole: turn the store off for
        good (every later prompt is tokenised whole) and say so."""
        self.store = None
        self.hazard = "tokenising at checkpoints differed from tokenising whole on a prompt"
        _log.error(
            "prefix store turned off: spliced token ids differ from a whole tokenisation",
            chars=len(text),
            hint="please report the tokenizer; prompts are tokenised whole from now on",
        )

    def body_ids(self, text: str) -> array[int]:
        """Ids of ``text`` without special tokens, as vLLM tokenises a rendered chat."""
        return self.finish(self.lookup(text))

    def completion_ids(self, text: str, body: array[int] | None = None) -> array[int]:
        """Ids of ``text`` as a completion prompt: special tokens around its body ids.

        ``body`` may be given when already computed (``body_ids`` of the same text).
        """
        if self._wrapper is None:
            assert self._full is not None
            encoding = self._full.encode_batch_fast([text], add_special_tokens=True)[0]
            return array(TOKEN_TYPECODE, encoding.ids)
        prefix, suffix = self._wrapper
        ids = array(TOKEN_TYPECODE, prefix)
        ids.extend(self.body_ids(text) if body is None else body)
        ids.fromlist(list(suffix))
        return ids

    @property
    def wraps(self) -> bool:
        """Whether completion ids are the body ids between fixed special tokens (so the
        store serves completions too); false only for unusual post-processors."""
        return self._wrapper is not None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerFileError(f"{path}: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: object) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or an AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str | list[str]]:
    tokens: dict[str, str | list[str]] = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is not None:
            tokens[name] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [
            t for t in (_token_text(v) for v in extra) if t is not None
        ]
    return tokens


def _wrapper(
    tokenizer: Tokenizer,
    config: Mapping[str, Any],
    special_tokens: Mapping[str, str | list[str]],
) -> _Wrapper | None:
    """The special tokens the post-processor puts before and after any text, or None if
    they are not the same for every probe. ``add_bos_token``/``add_eos_token`` in the config
    override the post-processor, as transformers does when they are set."""
    wrapper: _Wrapper | None = None
    for probe in _WRAPPER_PROBES:
        around = _around(
            tokenizer.encode(probe, add_special_tokens=True).ids,
            tokenizer.encode(probe, add_special_tokens=False).ids,
        )
        if around is None or (wrapper is not None and around != wrapper):
            return None
        wrapper = around
    if wrapper is None:
        return None
    prefix, suffix = wrapper
    bos = _token_id(tokenizer, special_tokens.get("bos_token"))
    eos = _token_id(tokenizer, special_tokens.get("eos_token"))
    add_bos = config.get("add_bos_token")
    add_eos = config.get("add_eos_token")
    if bos is not None and isinstance(add_bos, bool):
        has = prefix[:1] == (bos,)
        prefix = (
            (bos, *prefix) if add_bos and not has else prefix[1:] if has and not add_bos else prefix
        )
    if eos is not None and isinstance(add_eos, bool):
        has = suffix[-1:] == (eos,)
        suffix = (
            (*suffix, eos)
            if add_eos and not has
            else suffix[:-1]
            if has and not add_eos
            else suffix
        )
    return prefix, suffix


def _around(full: Sequence[int], body: Sequence[int]) -> _Wrapper | None:
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return tuple(full[:start]), tuple(full[start + len(body) :])
    return None


def _token_id(tokenizer: Tokenizer, token: object) -> int | None:
    return tokenizer.token_to_id(token) if isinstance(token, str) else None
