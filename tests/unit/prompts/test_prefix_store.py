"""The prefix store yields exactly the tokens of a whole tokenisation, for every tokenizer
family, and reuses what it has seen."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from service.prompts.boundaries import CutRule
from service.prompts.tokenizer import TextTokenizer
from tests.unit.prompts.build import BOS, CORPUS, IM_END, IM_START, KINDS, tokenizer_json

STRIDE = 6  # tiny, so short texts have many checkpoints
RSTRIP = "<|end|>"
VARIANTS = [*KINDS, "llama3+rstrip"]

FRAGMENTS = st.sampled_from(
    [
        *(word for line in CORPUS for word in line.split(" ")[:6]),
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        ".",
        ",",
        "'s",
        "'ll",
        "--",
        "(",
        ")",
        "123",
        "4567",
        "é",
        "e\u0301",
        "\u0301",
        "東京",
        "🙂",
        "\u2581",
        "a",
        "b",
        "x y",
        BOS,
        IM_START,
        IM_END,
        RSTRIP,
    ]
)
TEXTS = st.lists(FRAGMENTS, max_size=30).map("".join)


def _json(variant: str) -> str:
    if variant == "llama3+rstrip":
        return tokenizer_json("llama3", rstrip_token=RSTRIP)
    return tokenizer_json(variant)  # type: ignore[arg-type]


class Pair(NamedTuple):
    """A TextTokenizer with a store, and the plain tokenizer as the reference."""

    tokenizer: TextTokenizer
    reference: Tokenizer
    variant: str

    def __repr__(self) -> str:
        return f"Pair({self.variant})"


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request: pytest.FixtureRequest) -> Pair:
    text = _json(request.param)
    tokenizer = TextTokenizer(text, {}, store_bytes=1 << 24, stride=STRIDE)
    return Pair(tokenizer, Tokenizer.from_str(text), request.param)


def test_only_the_legacy_prepend_layout_is_kept_from_the_store(pair: Pair) -> None:
    if pair.variant == "prepend":
        assert pair.tokenizer.hazard == "a Prepend normalizer"
        assert pair.tokenizer.store is None
    else:
        assert pair.tokenizer.hazard is None


@settings(max_examples=150)
@given(prefix=TEXTS, endings=st.lists(TEXTS, min_size=1, max_size=3))
def test_spliced_ids_equal_a_whole_tokenisation(
    pair: Pair, prefix: str, endings: list[str]
) -> None:
    tokenizer, reference, _ = pair
    store = tokenizer.store
    if store is not None:
        store.clear()
    seen: list[list[str]] = []  # the prefixes at the checkpoints of the texts so far
    for text in (prefix, *(prefix + ending for ending in endings)):
        if store is not None:
            # Every leading checkpoint shared with a text seen before is found.
            heads = [text[:cut] for cut in store.checkpoints(text)]
            shared = max((_common_start(heads, before) for before in seen), default=0)
            assert store.lookup(text).known == shared
            seen.append(heads)
        body = reference.encode(text, add_special_tokens=False).ids
        assert list(tokenizer.body_ids(text)) == body
        assert list(tokenizer.completion_ids(text)) == reference.encode(text).ids


def _common_start(first: list[str], second: list[str]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


def test_a_cut_inside_a_word_would_change_the_tokens() -> None:
    """Why cuts must be safe: BPE merges across an arbitrary cut."""
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    text = "The quick brown fox jumps over the lazy dog."
    whole = reference.encode(text, add_special_tokens=False).ids
    cut = text.index("quick") + 2
    halves = [
        reference.encode(part, add_special_tokens=False).ids for part in (text[:cut], text[cut:])
    ]
    assert halves[0] + halves[1] != whole


def test_a_longer_text_reuses_the_segments_of_its_prefix() -> None:
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 20, stride=64)
    assert tokenizer.store is not None
    prefix = " ".join(CORPUS)
    tokenizer.body_ids(prefix)
    before = tokenizer.store.stats()
    text = prefix + " And one more sentence at the end."
    splice = tokenizer.lookup(text)
    assert len(prefix) - 2 * 64 <= splice.start <= len(prefix)
    assert list(tokenizer.finish(splice)) == tokenizer.body_ids(text).tolist()
    after = tokenizer.store.stats()
    assert after.chars_reused - before.chars_reused >= 2 * (len(prefix) - 2 * 64)


def test_the_store_stays_within_its_byte_bound_and_stays_exact() -> None:
    bound = 6_000
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=bound, stride=16)
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    assert tokenizer.store is not None
    for round_ in range(3):
        for line in CORPUS:
            text = f"{line} {round_} {line}"
            expected = reference.encode(text, add_special_tokens=False).ids
            assert tokenizer.body_ids(text).tolist() == expected
            assert tokenizer.store.stats().bytes <= bound
    stats = tokenizer.store.stats()
    assert stats.evictions > 0
    assert stats.segments > 0


def test_many_continuations_of_one_prefix_are_each_found_exactly() -> None:
    """A shared system prompt, then different texts: past a handful of stored continuations
    under one probe, the lookup finds the right one by its checkpoint, not by a scan."""
    stride = 256
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=1 << 24, stride=stride)
    reference = Tokenizer.from_str(tokenizer_json("llama3"))
    store = tokenizer.store
    assert store is not None
    system = " ".join(CORPUS)[:300]
    words = " ".join(CORPUS).split()
    # The segment from the first checkpoint (~256) on starts inside the shared text, so
    # every text's second segment has the same probe; the texts differ from ~300 on.
    texts = [f"{system} {' '.join(words[i:] + words[:i])} {i}" for i in range(40)]
    for text in texts:
        tokenizer.body_ids(text)
    assert max(len(siblings) for siblings in store._by_probe.values()) > 4
    for text in texts:
        splice = store.lookup(text)
        assert splice.start > stride  # past the shared segment
        assert (
            splice.ids.tolist()
            == reference.encode(text[: splice.start], add_special_tokens=False).ids
        )
        assert (
            tokenizer.finish(splice).tolist()
            == reference.encode(text, add_special_tokens=False).ids
        )


def test_a_store_of_zero_bytes_is_off() -> None:
    tokenizer = TextTokenizer(tokenizer_json("llama3"), {}, store_bytes=0)
    assert tokenizer.store is None
    assert tokenizer.hazard == "disabled"


@given(first=TEXTS, second=TEXTS, stride=st.integers(1, 12))
def test_a_text_keeps_every_checkpoint_of_its_prefixes(
    first: str, second: str, stride: int
) -> None:
    rule = CutRule(frozenset(">"))
    cuts = rule.checkpoints(first, stride)
    assert rule.checkpoints(first + second, stride)[: len(cuts)] == cuts
    assert all(rule.is_safe(first, cut) for cut in cuts)
    assert rule.all_cuts(first) == [i for i in range(len(first)) if rule.is_safe(first, i)]


def test_safe_cuts_are_single_spaces_between_non_spaces() -> None:
    rule = CutRule(frozenset(">"))
    text = "ab cd  ef\tg h\u2581 i<x> y z"
    assert [i for i in range(len(text)) if rule.is_safe(text, i)] == [2, 11, 21]
    assert rule.all_cuts(text) == [2, 11, 21]
    assert not rule.is_safe(" a", 0)
    assert not rule.is_safe("a ", 1)
