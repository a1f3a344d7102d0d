"""Where a text may be cut so that its halves tokenise to the tokens of the whole.

A *safe cut* is a position ``b`` where ``text[b]`` is a single space between two
non-whitespace characters (``CutRule``). For the tokenizers that pass ``splice_hazard``
(byte-level BPE with a GPT-2/Llama-3/Qwen-style split regex, Metaspace/SentencePiece-style
BPE or Unigram, BERT-style WordPiece) such a position is a hard pre-token boundary:

- the pre-token ending at ``b - 1`` cannot take in the space at ``b`` (no split pattern in
  these families continues a non-space run into whitespace), and the pre-token starting at
  ``b`` depends only on the text from ``b`` on (the patterns look ahead, never behind);
- a normaliser that passes the check maps characters one at a time (or composes marks,
  which never compose with a space), so it normalises the halves as it does the whole;
- the model (BPE merges, Unigram Viterbi, WordPiece) works within one pre-token.

Hence ``tokens(text) == tokens(text[:b]) + tokens(text[b:])`` for every safe cut ``b``.
``splice_hazard`` rejects the structures that break the argument (a ``Prepend`` or
left-``Strip`` normaliser, regex replacements, no pre-tokenizer, added tokens containing
whitespace, BPE dropout, unknown components) and then checks the property on a probe text;
a rejected tokenizer simply tokenises every prompt whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tokenizers import Tokenizer

__all__ = ["PROBE_TEXT", "CutRule", "splice_hazard"]

# A literal SentencePiece space mark before the cut could merge with the mark the space
# becomes ("▁▁"), so it does not count as a non-space neighbour.
_SPACE_MARKS: Final = frozenset("\u2581")

_LOCAL_NORMALIZERS: Final = frozenset(
    {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer", "ByteLevel"}
)
_SPLITTING_PRE_TOKENIZERS: Final = frozenset(
    {
        "ByteLevel",
        "Whitespace",
        "WhitespaceSplit",
        "BertPreTokenizer",
        "Punctuation",
        "Digits",
        "CharDelimiterSplit",
    }
)

PROBE_TEXT: Final = (
    "The quick brown fox, aged 12345, jumped over 3 lazy dogs!  Twice\tthen\n\nthrice. "
    "It's what they'll do: don't panic -- (really) [ok] {x: 1} a+b=c; e.g. x.y_z() "
    "naïve café Ünïcödé façade 東京 123 \uff14\uff15\uff16 emoji 🙂 👍🏽 done.\n"
    "def f(x):\n    return x ** 2  # square\n"
    "   leading spaces and trailing   \n"
    "The END of the probe text is here ,, .. !! ?? ... ok"
)
"""Mixed text the splice property is checked on when a tokenizer is loaded."""


@dataclass(frozen=True, slots=True)
class CutRule:
    """Safe cuts for one tokenizer: a space between non-spaces, not right after the last
    character of an added token that strips whitespace to its right (that token takes the
    space in, so the cut would split it)."""

    unsafe_before: frozenset[str] = frozenset()
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Python's \s is str.isspace(), a superset of the tokenizers' (Unicode White_Space).
        excluded = "".join(sorted(_SPACE_MARKS | self.unsafe_before))
        pattern = re.compile(rf"(?<=[^\s{re.escape(excluded)}]) (?=\S)")
        object.__setattr__(self, "_pattern", pattern)

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> CutRule:
        """The rule for the parsed ``tokenizer.json`` ``spec``."""
        ends = {
            token["content"][-1]
            for token in spec.get("added_tokens") or ()
            if isinstance(token, Mapping)
            and token.get("rstrip")
            and isinstance(token.get("content"), str)
            and token["content"]
        }
        return cls(frozenset(ends))

    def is_safe(self, text: str, position: int) -> bool:
        """Whether ``text`` may be cut before ``position``."""
        if not 0 < position < len(text) - 1 or text[position] != " ":
            return False
        before = text[position - 1]
        return not (
            before.isspace()
            or before in _SPACE_MARKS
            or before in self.unsafe_before
            or text[position + 1].isspace()
        )

    def checkpoints(self, text: str, stride: int, after: int = 0, *, min_gap: int = 1) -> list[int]:
        """Safe cuts about ``stride`` characters apart: the first safe cut at or after the
        first multiple of ``stride`` that is at least ``min_gap`` (<= ``stride``) past the
        previous cut. ``after``: start past this checkpoint of ``text`` (0: from the start).

        A cut depends only on the text up to one character past it, so two texts sharing a
        prefix share the checkpoints inside it. One regex search per cut.
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if not 1 <= min_gap <= stride:
            raise ValueError(f"min_gap must be in [1, stride], got {min_gap}")
        cuts: list[int] = []
        search = self._pattern.search
        mark = _next_mark(after, stride, min_gap)
        while (found := search(text, mark)) is not None:
            cut = found.start()
            cuts.append(cut)
            mark = _next_mark(cut, stride, min_gap)
        return cuts

    def next_checkpoint(
        self, text: str, stride: int, after: int = 0, *, min_gap: int = 1
    ) -> int | None:
        """The first of ``checkpoints(text, stride, after, min_gap=min_gap)``, or None."""
        found = self._pattern.search(text, _next_mark(after, stride, min_gap))
        return None if found is None else found.start()

    def all_cuts(self, text: str) -> list[int]:
        """Every safe cut of ``text``, in order."""
        return [found.start() for found in self._pattern.finditer(text)]


def _next_mark(cut: int, stride: int, min_gap: int) -> int:
    """Where the search for the checkpoint after ``cut`` starts: the first multiple of
    ``stride`` at least ``min_gap`` past it."""
    return -(-(cut + min_gap) // stride) * stride


def splice_hazard(tokenizer: Tokenizer, spec: Mapping[str, Any], rule: CutRule) -> str | None:
    """Why safe cuts may not be token boundaries for this tokenizer, or None if they are.

    ``spec`` is the parsed ``tokenizer.json``. The structure is checked first, then the
    splice property itself on ``PROBE_TEXT`` plus the tokenizer's added tokens.
    """
    reason = (
        _normalizer_hazard(spec.get("normalizer"))
        or _pre_tokenizer_hazard(spec.get("pre_tokenizer"))
        or _model_hazard(spec.get("model"))
        or _added_tokens_hazard(spec.get("added_tokens"))
    )
    if reason is not None:
        return reason
    added = [t["content"] for t in spec.get("added_tokens") or () if isinstance(t, dict)]
    probe = PROBE_TEXT + " " + " ".join(str(c) for c in added[:64]) + " x"
    cuts = rule.all_cuts(probe)
    whole = tokenizer.encode(probe, add_special_tokens=False).ids
    pieces = [probe[a:b] for a, b in zip([0, *cuts], [*cuts, len(probe)], strict=True)]
    spliced = [i for e in tokenizer.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
    if spliced != whole:
        return "tokenising at safe cuts differs from tokenising whole on the probe text"
    return None


def _component(node: object) -> tuple[str, Mapping[str, Any]] | None:
    if not isinstance(node, Mapping):
        return None
    kind = node.get("type")
    return (kind, node) if isinstance(kind, str) else None


def _children(node: Mapping[str, Any], key: str) -> Sequence[object]:
    children = node.get(key)
    return children if isinstance(children, list) else []


def _normalizer_hazard(node: object) -> str | None:
    if node is None:
        return None
    component = _component(node)
    if component is None:
        return "unreadable normalizer"
    kind, body = component
    if kind == "Sequence":
        for child in _children(body, "normalizers"):
            if (reason := _normalizer_hazard(child)) is not None:
                return reason
        return None
    if kind in _LOCAL_NORMALIZERS:
        return None
    if kind == "Strip":
        return "a Strip normalizer strips the start of a cut" if body.get("strip_left") else None
    if kind == "Replace":
        pattern = body.get("pattern")
        text = pattern.get("String") if isinstance(pattern, Mapping) else None
        # One character at a time, or a string no match of which can span a space.
        if isinstance(text, str) and (len(text) == 1 or not any(c.isspace() for c in text)):
            return None
        return "a Replace normalizer whose pattern may span a cut"
    return f"a {kind} normalizer"


def _pre_tokenizer_hazard(node: object) -> str | None:
    if node is None:
        return "no pre-tokenizer: the model sees the whole text as one word"
    component = _component(node)
    if component is None:
        return "unreadable pre-tokenizer"
    kind, body = component
    if kind == "Sequence":
        children = _children(body, "pretokenizers")
        if not children:
            return "an empty pre-tokenizer sequence"
        for child in children:
            if (reason := _pre_tokenizer_hazard(child)) is not None:
                return reason
        return None
    if kind in _SPLITTING_PRE_TOKENIZERS:
        return None
    if kind == "Metaspace":
        return None if body.get("split", True) else "a Metaspace pre-tokenizer that never splits"
    if kind == "Split":
        pattern = body.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, Mapping) else None
        if isinstance(regex, str) and "(?<" in regex:
            return "a Split pattern that looks behind"
        if body.get("behavior") in ("MergedWithPrevious", "Contiguous"):
            return f"a Split pre-tokenizer merging {body.get('behavior')}"
        return None
    return f"a {kind} pre-tokenizer"


def _model_hazard(node: object) -> str | None:
    component = _component(node)
    if component is None:
        # Older files leave BPE's type out; a dropout field is still telling.
        return None if isinstance(node, Mapping) and not node.get("dropout") else "unknown model"
    kind, body = component
    if kind == "BPE" and body.get("dropout"):
        return "BPE dropout"
    if kind not in ("BPE", "Unigram", "WordPiece", "WordLevel"):
        return f"a {kind} model"
    return None


def _added_tokens_hazard(tokens: object) -> str | None:
    # An all-whitespace token cannot match across a safe cut (one space between
    # non-spaces), and stripping tokens take in whitespace on their own side only.
    for token in tokens if isinstance(tokens, list) else ():
        content = token.get("content") if isinstance(token, Mapping) else None
        if isinstance(content, str) and not content.isspace() and any(c.isspace() for c in content):
            return f"added token {content!r} contains whitespace"
    return None
