"""vLLM's block hash in C++ (native/vllm_hash.cpp) against its Python reference.

The reference is ``service.index.keys.VllmKeys`` (pickle and cbor2 themselves underneath):
the real vLLM vectors first, then the exact bytes each serializer writes, then differential
properties of ``VllmHasher`` against ``VllmKeys``: keys, chains across calls, the bounded
digest memory and ``check_published``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import _dataplane
from service.index.keys import TOKEN_TYPECODE, UnknownParent, VllmKeys

Algorithm = Literal["sha256", "sha256_cbor"]
ALGORITHMS: list[Algorithm] = ["sha256", "sha256_cbor"]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
BLOCK = 16
# CONTRACT.md section 2: the default algorithm over list(range(1000, 1040)), block size 16.
RANGE_TOKENS = list(range(1000, 1040))
PICKLE_NO_SEED = [7322446309363477352, 17027874615116373601]
PICKLE_SEED_0 = [16823396573910764246, 9852303496387231819]

# Where an encoding changes width: pickle BININT1/BININT2/BININT/LONG1 at 2**8, 2**16,
# 2**31; CBOR's inline/1/2/4-byte uints at 24, 2**8, 2**16; and the ends of uint32.
EDGES = [0, 2**32 - 1]
for _edge in (24, 2**8, 2**16, 2**31):
    EDGES += [_edge - 1, _edge]

token_id = st.one_of(st.sampled_from(EDGES), st.integers(0, 2**32 - 1), st.integers(0, 300))
# Strs by their UTF-8 length: short, non-ASCII, empty, and around the 255-byte
# SHORT_BINUNICODE / 23- and 255-byte CBOR length limits.
text = st.one_of(
    st.just(""),
    st.text(max_size=6),
    st.sampled_from(["a", "é", "adapter-ü", "租户-7", "🦙"]),
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["x", "é", "€", "🦙"]),
        st.sampled_from([23, 24, 85, 127, 128, 255, 256, 300]),
    ),
)
maybe_text = st.none() | text
seeds = st.sampled_from([None, "0", "42", "種子-é", "s" * 300]) | st.text(max_size=4)


def packed(tokens: Sequence[int]) -> array[int]:
    return array(TOKEN_TYPECODE, tokens)


def pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=5)


def cbor(obj: object) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


ENCODERS = {"sha256": pickled, "sha256_cbor": cbor}


def pair(
    algorithm: Algorithm, seed: str | None = None, max_parents: int = 1000
) -> tuple[_dataplane.VllmHasher, VllmKeys]:
    return (
        _dataplane.VllmHasher(algorithm, seed, max_parents),
        VllmKeys(algorithm, seed, max_parents=max_parents),
    )


# --- real vLLM vectors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture() -> dict[str, Any]:
    with (FIXTURES / "vllm_capture_sha256_cbor_seed42.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def test_the_400_token_capture(capture: dict[str, Any]) -> None:
    assert (capture["hash_algorithm"], capture["hash_seed"], capture["block_size"]) == (
        "sha256_cbor",
        "42",
        BLOCK,
    )
    hasher = _dataplane.VllmHasher("sha256_cbor", "42")
    assert hasher.block_keys(packed(capture["token_ids"]), BLOCK) == capture["block_hashes"]
    assert len(capture["block_hashes"]) == 25


def test_the_contract_vectors_for_the_default_algorithm() -> None:
    assert _dataplane.VllmHasher().block_keys(packed(RANGE_TOKENS), BLOCK) == PICKLE_NO_SEED
    seeded = _dataplane.VllmHasher("sha256", "0")
    assert seeded.block_keys(packed(RANGE_TOKENS), BLOCK) == PICKLE_SEED_0


def test_the_capture_checked_event_by_event(capture: dict[str, Any]) -> None:
    # The engine publishes a prompt as several BlockStored events, each naming its parent.
    tokens, published = capture["token_ids"], capture["block_hashes"]
    hasher = _dataplane.VllmHasher("sha256_cbor", "42")
    parent = None
    for first, last in [(0, 5), (5, 6), (6, 20), (20, 25)]:
        event = packed(tokens[first * BLOCK : last * BLOCK])
        assert hasher.check_published(event, BLOCK, published[first:last], parent) == "match"
        parent = published[last - 1]
    assert hasher.remembered == 25


def test_root_is_the_hash_of_the_seed() -> None:
    assert _dataplane.VllmHasher().root == hashlib.sha256(pickled("vllm-none-hash")).digest()
    cbor_root = _dataplane.VllmHasher("sha256_cbor", "42").root
    assert cbor_root == hashlib.sha256(cbor("42")).digest()


# --- the bytes: exactly what pickle and cbor2 write ---------------------------------------


@settings(max_examples=300)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    parent=st.binary(min_size=32, max_size=32),
    tokens=st.lists(token_id, max_size=70),
    extra=st.none() | st.lists(text, min_size=1, max_size=5),
    repeat=st.booleans(),
)
def test_block_bytes_equal_pickle_and_cbor2(
    algorithm: Algorithm,
    parent: bytes,
    tokens: list[int],
    extra: list[str] | None,
    repeat: bool,
) -> None:
    if extra is not None and repeat:
        extra.append(extra[0])  # the same object twice: pickle writes a memo reference
    obj = (parent, tuple(tokens), None if extra is None else tuple(extra))
    native = _dataplane.vllm_encode_block(algorithm, parent, packed(tokens), extra)
    assert native == ENCODERS[algorithm](obj)


@settings(max_examples=100)
@given(algorithm=st.sampled_from(ALGORITHMS), seed=text)
def test_root_bytes_equal_pickle_and_cbor2(algorithm: Algorithm, seed: str) -> None:
    assert _dataplane.vllm_encode_root(algorithm, seed) == ENCODERS[algorithm](seed)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    ("tokens", "extra"),
    [
        # Pickle frames close at 64 KiB: inside a long tuple (at the item that crosses it),
        # and around any str of 64 KiB or more, which goes out unframed.
        ([2**32 - 1] * 14_000, None),
        ([7] * 40_000, None),
        ([1], ["y" * 65_535, "z"]),
        ([1], ["y" * 65_536, "z"]),
        ([1] * 30_000, ["é" * 40_000]),
        ([2**31] * 10_000, ["a", "b", "c", "d", "a" * 70_000]),
    ],
    ids=["long-tuple", "two-frames", "str-64k-1", "str-64k", "tuple-then-str", "many"],
)
def test_block_bytes_past_one_pickle_frame(
    algorithm: Algorithm, tokens: list[int], extra: list[str] | None
) -> None:
    parent = bytes(range(32))
    obj = (parent, tuple(tokens), None if extra is None else tuple(extra))
    native = _dataplane.vllm_encode_block(algorithm, parent, packed(tokens), extra)
    assert native == ENCODERS[algorithm](obj)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [65_535, 65_536, 100_000])
def test_long_seed_bytes(algorithm: Algorithm, size: int) -> None:
    seed = "s" * size
    assert _dataplane.vllm_encode_root(algorithm, seed) == ENCODERS[algorithm](seed)
    hasher, reference = pair(algorithm, seed)
    assert hasher.block_keys(packed(RANGE_TOKENS), BLOCK) == reference.block_keys(
        RANGE_TOKENS, BLOCK
    )


def test_lone_surrogates_follow_each_serializer() -> None:
    # pickle falls back to UTF-8 "surrogatepass"; cbor2 refuses the str.
    lora = "adapter-\ud800"
    hasher, reference = pair("sha256")
    expected = reference.block_keys(RANGE_TOKENS, BLOCK, lora_name=lora)
    assert hasher.block_keys(packed(RANGE_TOKENS), BLOCK, lora_name=lora) == expected
    cbor_hasher, cbor_reference = pair("sha256_cbor")
    with pytest.raises(UnicodeEncodeError):
        cbor_reference.block_keys(RANGE_TOKENS, BLOCK, lora_name=lora)
    with pytest.raises(UnicodeEncodeError):
        cbor_hasher.block_keys(packed(RANGE_TOKENS), BLOCK, lora_name=lora)


# --- block keys, differentially -------------------------------------------------------------


@settings(max_examples=250)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    seed=seeds,
    block_size=st.integers(1, 64),
    tokens=st.lists(token_id, max_size=200),
    lora_name=maybe_text,
    cache_salt=maybe_text,
)
def test_block_keys_equal_vllm_keys(
    algorithm: Algorithm,
    seed: str | None,
    block_size: int,
    tokens: list[int],
    lora_name: str | None,
    cache_salt: str | None,
) -> None:
    hasher, reference = pair(algorithm, seed)
    kw: dict[str, Any] = {"lora_name": lora_name, "cache_salt": cache_salt}
    expected = reference.block_keys(tokens, block_size, **kw)
    assert hasher.block_keys(packed(tokens), block_size, **kw) == expected
    assert len(expected) == len(tokens) // block_size


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("same_object", [True, False])
def test_salt_equal_to_the_lora_name(algorithm: Algorithm, same_object: bool) -> None:
    # pickle memoizes by identity: one str object given as both is written once, then
    # referenced; an equal but distinct str is written twice. Both as the reference does.
    lora = "".join(["tenant-", "7"])
    salt = lora if same_object else "".join(["tenant", "-7"])
    assert (salt is lora) == same_object
    hasher, reference = pair(algorithm)
    expected = reference.block_keys(RANGE_TOKENS, BLOCK, lora_name=lora, cache_salt=salt)
    got = hasher.block_keys(packed(RANGE_TOKENS), BLOCK, lora_name=lora, cache_salt=salt)
    assert got == expected


@settings(max_examples=120)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    seed=seeds,
    block_size=st.integers(1, 64),
    blocks=st.integers(0, 12),
    cuts=st.lists(st.integers(0, 12), max_size=3),
    lora_name=maybe_text,
    cache_salt=maybe_text,
    data=st.data(),
)
def test_chains_continued_across_calls(
    algorithm: Algorithm,
    seed: str | None,
    block_size: int,
    blocks: int,
    cuts: list[int],
    lora_name: str | None,
    cache_salt: str | None,
    data: st.DataObject,
) -> None:
    n = blocks * block_size
    tokens = data.draw(st.lists(token_id, min_size=n, max_size=n))
    hasher, reference = pair(algorithm, seed)
    kw: dict[str, Any] = {"lora_name": lora_name, "cache_salt": cache_salt}
    whole = reference.block_keys(tokens, block_size, **kw)
    bounds = sorted({0, blocks, *(min(cut, blocks) for cut in cuts)})
    keys: list[int] = []
    parent = None
    for first, last in itertools.pairwise(bounds):
        piece = tokens[first * block_size : last * block_size]
        got = hasher.block_keys(packed(piece), block_size, parent, remember=True, **kw)
        assert got == reference.block_keys(piece, block_size, parent=parent, remember=True, **kw)
        keys += got
        parent = keys[-1]
    assert keys == whole
    assert hasher.remembered == reference.remembered


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_unknown_parent_raises_as_the_reference(algorithm: Algorithm) -> None:
    hasher, reference = pair(algorithm)
    first = hasher.block_keys(packed(RANGE_TOKENS[:BLOCK]), BLOCK)  # not remembered
    for parent in (first[0], 0, 2**64 - 1, 2**64, -1):
        with pytest.raises(UnknownParent) as expected:
            reference.block_keys(RANGE_TOKENS, BLOCK, parent=parent)
        with pytest.raises(_dataplane.UnknownParent) as got:
            hasher.block_keys(packed(RANGE_TOKENS), BLOCK, parent=parent)
        assert isinstance(got.value, LookupError)
        assert (got.value.parent, str(got.value)) == (expected.value.parent, str(expected.value))
    assert hasher.remembered == reference.remembered == 0


# --- the digest memory: bounded, two generations ----------------------------------------------

operation = st.tuples(
    st.sampled_from(["store", "continue", "check", "check-corrupt"]),
    st.integers(0, 40),  # a prompt, or an earlier key to continue from
    st.integers(1, 4),  # blocks
    st.booleans(),  # remember (continue) / start a prompt (check)
)


@settings(max_examples=120)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    max_parents=st.integers(2, 12),
    operations=st.lists(operation, min_size=1, max_size=40),
)
def test_digest_memory_follows_the_reference(
    algorithm: Algorithm, max_parents: int, operations: list[tuple[str, int, int, bool]]
) -> None:
    # Every call on both, in the same order; each answer and the count of remembered digests
    # must agree, so the generation flips, the copying of old hits and the forgetting match.
    hasher, reference = pair(algorithm, "7", max_parents)
    oracle = VllmKeys(algorithm, "7", max_parents=10_000)  # knows every digest ever made
    seen: list[int] = []
    bs = 4

    def prompt(n: int, blocks: int) -> list[int]:
        return [(n * 7919 + i * 104_729) % 2**32 for i in range(blocks * bs)]

    for kind, n, blocks, flag in operations:
        tokens = prompt(n, blocks)
        parent = seen[n % len(seen)] if seen else None
        if kind == "store" or parent is None:
            got = hasher.block_keys(packed(tokens), bs, remember=True)
            assert got == reference.block_keys(tokens, bs, remember=True)
            oracle.block_keys(tokens, bs, remember=True)
            seen += got
        elif kind == "continue":
            try:
                expected: list[int] | None = reference.block_keys(
                    tokens, bs, parent=parent, remember=flag
                )
            except UnknownParent:
                expected = None
            try:
                got_keys: list[int] | None = hasher.block_keys(
                    packed(tokens), bs, parent, remember=flag
                )
            except _dataplane.UnknownParent:
                got_keys = None
            assert got_keys == expected
            if expected is not None and flag:
                oracle.block_keys(tokens, bs, parent=parent, remember=True)
                seen += expected
        else:
            start = None if flag else parent
            published = oracle.block_keys(tokens, bs, parent=start, remember=True)
            if kind == "check-corrupt":
                published[n % blocks] ^= 1 << (n % 64)
            outcome = reference.check_published(tokens, bs, published, parent=start)
            assert hasher.check_published(packed(tokens), bs, published, start) == outcome.value
            if kind == "check":
                seen += published
        assert hasher.remembered == reference.remembered <= max_parents


def test_digests_in_use_survive_and_the_rest_are_forgotten() -> None:
    hasher = _dataplane.VllmHasher(max_parents=8)
    system = hasher.block_keys(packed(range(BLOCK)), BLOCK, remember=True)
    others = []
    for i in range(40):
        tokens = packed(range(100 + i * BLOCK, 100 + (i + 1) * BLOCK))
        others.append(hasher.block_keys(tokens, BLOCK, remember=True)[0])
        assert hasher.remembered <= 8
        hasher.block_keys(packed(RANGE_TOKENS), BLOCK, system[0])  # a hit keeps it young
    with pytest.raises(_dataplane.UnknownParent):
        hasher.block_keys(packed(RANGE_TOKENS), BLOCK, others[0])
    hasher.block_keys(packed(RANGE_TOKENS), BLOCK, others[-1])


# --- check_published -------------------------------------------------------------------------


@settings(max_examples=80)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    block_size=st.integers(1, 64),
    blocks=st.integers(1, 6),
    flip=st.integers(0, 63),
    position=st.integers(0, 5),
    lora_name=maybe_text,
    cache_salt=maybe_text,
    data=st.data(),
)
def test_check_published_outcomes(
    algorithm: Algorithm,
    block_size: int,
    blocks: int,
    flip: int,
    position: int,
    lora_name: str | None,
    cache_salt: str | None,
    data: st.DataObject,
) -> None:
    n = blocks * block_size
    tokens = data.draw(st.lists(token_id, min_size=2 * n, max_size=2 * n))
    head, tail = tokens[:n], tokens[n:]
    hasher, reference = pair(algorithm, "42")
    kw: dict[str, Any] = {"lora_name": lora_name, "cache_salt": cache_salt}
    published = VllmKeys(algorithm, "42").block_keys(tokens, block_size, **kw)
    first, rest = published[:blocks], published[blocks:]

    def both(part: list[int], hashes: list[int], parent: int | None) -> str:
        outcome = reference.check_published(part, block_size, hashes, parent=parent, **kw).value
        assert hasher.check_published(packed(part), block_size, hashes, parent, **kw) == outcome
        assert hasher.remembered == reference.remembered
        return outcome

    # The continuation cannot be checked before its parent's event; a flipped bit anywhere
    # is a mismatch and remembers nothing; the right hashes match and are remembered.
    assert both(tail, rest, first[-1]) == "unknown_parent"
    wrong = list(first)
    wrong[position % blocks] ^= 1 << flip
    assert both(head, wrong, None) == "mismatch"
    assert hasher.remembered == 0
    assert both(head, first, None) == "match"
    assert both(tail, rest, first[-1]) == "match"
    assert hasher.remembered == 2 * blocks


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_check_published_rejects_a_malformed_event(algorithm: Algorithm) -> None:
    hasher, reference = pair(algorithm)
    tokens = list(range(40))
    for count, published in [(32, [1, 2, 3]), (40, [1, 2]), (0, [1]), (16, [])]:
        with pytest.raises(ValueError) as expected:
            reference.check_published(tokens[:count], BLOCK, published)
        with pytest.raises(ValueError) as got:
            hasher.check_published(packed(tokens[:count]), BLOCK, published)
        assert str(got.value) == str(expected.value)
    for block_size in (0, -16, 16.0, "16", True):
        with pytest.raises(ValueError, match="block_size"):
            hasher.check_published(packed(tokens[:16]), block_size, [1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="block_size"):
            hasher.block_keys(packed(tokens[:16]), block_size)  # type: ignore[arg-type]
    assert hasher.check_published(packed([]), BLOCK, []) == "match"


@pytest.mark.parametrize("bad", [-1, 2**64, "7", None])
def test_a_published_hash_that_is_no_uint64_is_a_mismatch(bad: Any) -> None:
    hasher, reference = pair("sha256")
    published = reference.block_keys(RANGE_TOKENS[:32], BLOCK)
    hashes = [published[0], bad]
    assert reference.check_published(RANGE_TOKENS[:32], BLOCK, hashes).value == "mismatch"
    assert hasher.check_published(packed(RANGE_TOKENS[:32]), BLOCK, hashes) == "mismatch"
    assert hasher.check_published(packed(RANGE_TOKENS[:32]), BLOCK, hashes, 5) == "unknown_parent"


# --- construction and threads ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("md5",), "hash_algorithm must be one of ['sha256', 'sha256_cbor'], got 'md5'"),
        (("sha256", 42), "seed must be a string (as PYTHONHASHSEED is), got 42"),
        (("sha256", None, 1), "max_parents must be an int >= 2, got 1"),
        (("sha256", None, True), "max_parents must be an int >= 2, got True"),
    ],
)
def test_bad_settings_are_refused_as_the_reference_does(
    args: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValueError) as expected:
        VllmKeys(*args[:2], max_parents=args[2] if len(args) > 2 else 1000)
    with pytest.raises(ValueError) as got:
        _dataplane.VllmHasher(*args)
    assert str(got.value) == str(expected.value) == message


def test_attributes() -> None:
    hasher = _dataplane.VllmHasher("sha256_cbor", None, 64)
    assert (hasher.algorithm, hasher.seed, hasher.max_parents) == (
        "sha256_cbor",
        "vllm-none-hash",
        64,
    )
    assert repr(hasher) == "VllmHasher(algorithm='sha256_cbor', seed='vllm-none-hash')"


def test_tokens_must_be_a_flat_uint32_buffer() -> None:
    hasher = _dataplane.VllmHasher()
    as_bytes = packed(RANGE_TOKENS).tobytes()
    assert hasher.block_keys(as_bytes, BLOCK) == PICKLE_NO_SEED
    with pytest.raises(ValueError, match="uint32"):
        hasher.block_keys(memoryview(packed(RANGE_TOKENS * 2))[::2], BLOCK)
    with pytest.raises(ValueError, match="uint32"):
        hasher.block_keys(array("q", RANGE_TOKENS), BLOCK)


def test_one_hasher_shared_by_threads() -> None:
    # Hashing runs without the GIL; the lock keeps the shared digest memory consistent.
    hasher = _dataplane.VllmHasher("sha256", "1")
    prompts = [[(t * 31 + i) % 151_000 for i in range(64 * BLOCK)] for t in range(4)]
    expected = [VllmKeys("sha256", "1").block_keys(p, BLOCK) for p in prompts]
    results: list[list[list[int]]] = [[] for _ in prompts]

    def work(t: int) -> None:
        for _ in range(20):
            results[t].append(hasher.block_keys(packed(prompts[t]), BLOCK, remember=True))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t, keys in enumerate(expected):
        assert results[t] == [keys] * 20
    assert hasher.remembered == 4 * 64
