"""Block keys: vLLM's published hashes reproduced, and the service's own chained keys."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.index.keys import (
    BlockKeyer,
    HashCheck,
    TokenKeys,
    UnknownParent,
    VllmKeys,
    make_keyer,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REPO_ROOT = Path(__file__).resolve().parents[3]
BLOCK = 16
# CONTRACT.md section 2: vLLM's default algorithm over list(range(1000, 1040)), block size 16.
RANGE_TOKENS = list(range(1000, 1040))
PICKLE_NO_SEED = [7322446309363477352, 17027874615116373601]
PICKLE_SEED_0 = [16823396573910764246, 9852303496387231819]


@pytest.fixture(scope="module")
def capture() -> dict[str, Any]:
    with (FIXTURES / "vllm_capture_sha256_cbor_seed42.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def _tokens(n: int, start: int = 7) -> list[int]:
    return [(start + 7919 * i) % 151_000 for i in range(n)]


def _reference_vllm(
    token_ids: Sequence[int],
    block_size: int,
    hash_fn: Callable[[object], bytes],
    seed: str,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """vLLM's request_block_hasher written out naively, extra keys and all."""
    parent = hash_fn(seed)
    published = []
    for start in range(0, len(token_ids) // block_size * block_size, block_size):
        extra: list[str] = [] if lora_name is None else [lora_name]
        if start == 0 and cache_salt:
            extra.append(cache_salt)
        parent = hash_fn(
            (parent, tuple(token_ids[start : start + block_size]), tuple(extra) or None)
        )
        published.append(int.from_bytes(parent, "big") & (2**64 - 1))
    return published


def _pickle_sha(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor_sha(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


ALL_KEYERS: list[Callable[[], VllmKeys | TokenKeys]] = [
    TokenKeys,
    lambda: VllmKeys("sha256"),
    lambda: VllmKeys("sha256_cbor", "42"),
]
KEYER_IDS = ["tokens", "vllm-sha256", "vllm-sha256_cbor"]


def _continue(keyer: VllmKeys | TokenKeys, tokens: Sequence[int], **kw: Any) -> list[int]:
    """Keys of ``tokens``; a VllmKeys remembers them so a later call can chain on."""
    if isinstance(keyer, VllmKeys):
        return keyer.block_keys(tokens, BLOCK, remember=True, **kw)
    return keyer.block_keys(tokens, BLOCK, **kw)


# --- vLLM's published hashes -------------------------------------------------------------


def test_vllm_capture_sha256_cbor_seed_42(capture: dict[str, Any]) -> None:
    assert capture["hash_algorithm"] == "sha256_cbor"
    assert capture["block_size"] == BLOCK
    for seed in (42, "42"):
        keyer = make_keyer("vllm", "sha256_cbor", seed)
        assert keyer.block_keys(capture["token_ids"], BLOCK) == capture["block_hashes"]


def test_vllm_capture_needs_the_engine_seed_and_algorithm(capture: dict[str, Any]) -> None:
    tokens, published = capture["token_ids"], capture["block_hashes"]
    assert VllmKeys("sha256_cbor", "43").block_keys(tokens, BLOCK)[0] != published[0]
    assert VllmKeys("sha256", "42").block_keys(tokens, BLOCK)[0] != published[0]


def test_vllm_default_algorithm_without_seed() -> None:
    assert make_keyer("vllm").block_keys(RANGE_TOKENS, BLOCK) == PICKLE_NO_SEED


def test_vllm_default_algorithm_with_pythonhashseed_0() -> None:
    assert make_keyer("vllm", "sha256", 0).block_keys(RANGE_TOKENS, BLOCK) == PICKLE_SEED_0
    assert VllmKeys("sha256", "0").block_keys(tuple(RANGE_TOKENS), BLOCK) == PICKLE_SEED_0


def test_vllm_accepts_any_int_sequence() -> None:
    as_array = array("I", RANGE_TOKENS)
    assert VllmKeys().block_keys(as_array, BLOCK) == PICKLE_NO_SEED
    assert VllmKeys().block_keys(range(1000, 1040), BLOCK) == PICKLE_NO_SEED


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize(
    ("lora_name", "cache_salt"), [("sql-adapter", None), (None, "tenant-7"), ("a", "s")]
)
def test_vllm_extra_keys_as_the_engine_builds_them(
    algorithm: str, lora_name: str | None, cache_salt: str | None
) -> None:
    # LoRA name in every block's extra keys, then the salt in the first block only.
    hash_fn = _pickle_sha if algorithm == "sha256" else _cbor_sha
    tokens = _tokens(70)
    keyer = make_keyer("vllm", algorithm, "9")
    expected = _reference_vllm(tokens, BLOCK, hash_fn, "9", lora_name, cache_salt)
    got = keyer.block_keys(tokens, BLOCK, lora_name=lora_name, cache_salt=cache_salt)
    assert got == expected
    assert got != keyer.block_keys(tokens, BLOCK)


# --- both schemes ----------------------------------------------------------------------


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
@pytest.mark.parametrize(
    ("lora_name", "cache_salt"), [(None, None), ("adapter", None), (None, "s")]
)
def test_chaining_from_a_parent_equals_hashing_the_whole_prompt(
    new_keyer: Callable[[], VllmKeys | TokenKeys], lora_name: str | None, cache_salt: str | None
) -> None:
    keyer = new_keyer()
    tokens = _tokens(10 * BLOCK + 5)
    kw = {"lora_name": lora_name, "cache_salt": cache_salt}
    whole = keyer.block_keys(tokens, BLOCK, lora_name=lora_name, cache_salt=cache_salt)
    assert len(whole) == 10
    head = _continue(keyer, tokens[: 3 * BLOCK], **kw)
    middle = _continue(keyer, tokens[3 * BLOCK : 7 * BLOCK], parent=head[-1], **kw)
    tail = keyer.block_keys(
        tokens[7 * BLOCK :], BLOCK, parent=middle[-1], lora_name=lora_name, cache_salt=cache_salt
    )
    assert head + middle + tail == whole


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
def test_partial_trailing_block_is_ignored(
    new_keyer: Callable[[], VllmKeys | TokenKeys],
) -> None:
    keyer = new_keyer()
    tokens = _tokens(3 * BLOCK)
    full = keyer.block_keys(tokens, BLOCK)
    assert len(full) == 3
    assert keyer.block_keys([*tokens, 1, 2, 3], BLOCK) == full
    assert keyer.block_keys(tokens[:-1], BLOCK) == full[:2]
    assert keyer.block_keys(tokens[: BLOCK - 1], BLOCK) == []
    assert keyer.block_keys([], BLOCK) == []


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
def test_lora_name_changes_every_key(new_keyer: Callable[[], VllmKeys | TokenKeys]) -> None:
    keyer = new_keyer()
    tokens = _tokens(4 * BLOCK)
    chains = [keyer.block_keys(tokens, BLOCK, lora_name=name) for name in (None, "a", "b", "")]
    for position in range(4):
        assert len({chain[position] for chain in chains}) == 4


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
def test_cache_salt_enters_the_first_block_only(
    new_keyer: Callable[[], VllmKeys | TokenKeys],
) -> None:
    keyer = new_keyer()
    tokens = _tokens(4 * BLOCK)
    plain = keyer.block_keys(tokens, BLOCK)
    salted = _continue(keyer, tokens, cache_salt="tenant-1")
    other = keyer.block_keys(tokens, BLOCK, cache_salt="tenant-2")
    # Every key differs (they chain on the first), but the later blocks are hashed as
    # usual: continuing from the salted first key without the salt gives the same keys.
    assert all(len({a, b, c}) == 3 for a, b, c in zip(plain, salted, other, strict=True))
    rest = keyer.block_keys(tokens[BLOCK:], BLOCK, parent=salted[0])
    assert rest == salted[1:]
    assert keyer.block_keys(tokens[BLOCK:], BLOCK, parent=salted[0], cache_salt="x") == rest
    assert keyer.block_keys(tokens, BLOCK, cache_salt="") == plain


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, "7", None, 10**30])
def test_bad_token_ids_raise_value_error_naming_them(
    new_keyer: Callable[[], VllmKeys | TokenKeys], bad: object
) -> None:
    tokens: list[Any] = [*_tokens(20), bad, *_tokens(20)]
    with pytest.raises(ValueError, match=re.escape(f"token id {bad!r} at position 20 ")):
        new_keyer().block_keys(tokens, BLOCK)


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
@pytest.mark.parametrize("block_size", [0, -16, 16.0])
def test_bad_block_size_raises(
    new_keyer: Callable[[], VllmKeys | TokenKeys], block_size: Any
) -> None:
    with pytest.raises(ValueError, match="block_size"):
        new_keyer().block_keys(_tokens(32), block_size)


@pytest.mark.parametrize("new_keyer", ALL_KEYERS, ids=KEYER_IDS)
def test_token_id_bounds_are_inclusive(new_keyer: Callable[[], VllmKeys | TokenKeys]) -> None:
    keys = new_keyer().block_keys([0] * 8 + [2**32 - 1] * 8, BLOCK)
    assert len(keys) == 1
    assert 0 <= keys[0] < 2**64


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=6 * BLOCK),
    cut=st.integers(0, 6 * BLOCK),
    block_size=st.integers(1, 20),
    lora_name=st.none() | st.text(max_size=8),
    cache_salt=st.none() | st.text(max_size=8),
    mode=st.sampled_from(KEYER_IDS),
)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(
    tokens: list[int],
    cut: int,
    block_size: int,
    lora_name: str | None,
    cache_salt: str | None,
    mode: str,
) -> None:
    keyer = ALL_KEYERS[KEYER_IDS.index(mode)]()
    kw: dict[str, Any] = {"lora_name": lora_name, "cache_salt": cache_salt}
    keys = keyer.block_keys(tokens, block_size, **kw)
    assert len(keys) == len(tokens) // block_size
    assert all(0 <= key < 2**64 for key in keys)
    prefix = tokens[:cut]
    assert keyer.block_keys(prefix, block_size, **kw) == keys[: len(prefix) // block_size]


# --- tokens mode ------------------------------------------------------------------------

_SUBPROCESS_KEYS = """
import json, sys
from service.index.keys import TokenKeys
keyer = TokenKeys()
tokens = list(range(5000, 5100))
print(json.dumps([
    keyer.block_keys(tokens, 16),
    keyer.block_keys(tokens, 16, lora_name="adapter-é", cache_salt="salt"),
]))
"""


@pytest.mark.parametrize("hash_seed", ["0", "12345", "random"])
def test_tokens_keys_are_identical_across_processes(hash_seed: str) -> None:
    keyer = TokenKeys()
    tokens = list(range(5000, 5100))
    expected = [
        keyer.block_keys(tokens, 16),
        keyer.block_keys(tokens, 16, lora_name="adapter-é", cache_salt="salt"),
    ]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_KEYS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == expected


def test_tokens_keys_are_stable_across_releases() -> None:
    # Keys outlive a process (Redis backend, rolling upgrades): changing the scheme is a
    # breaking change that needs a new domain tag, not an accident. Golden values.
    keyer = TokenKeys()
    tokens = list(range(40))
    assert keyer.block_keys(tokens, 16) == [9047964865503304580, 5991342618492646479]
    assert keyer.block_keys(tokens, 16, lora_name="a") == [
        9079862230616181384,
        3022806864233194681,
    ]
    assert keyer.block_keys(tokens, 16, cache_salt="s") == [
        5763462942784974780,
        12636087554788786271,
    ]
    assert keyer.block_keys(tokens[:16], 16, lora_name="a", cache_salt="s") == [
        13270020716179410652
    ]


def test_tokens_keys_change_with_the_block_size() -> None:
    # An engine restarted with another block size must not match its old blocks.
    tokens = _tokens(64)
    by_16 = TokenKeys().block_keys(tokens, 16)
    by_32 = TokenKeys().block_keys(tokens, 32)
    assert len(by_16) == 4
    assert len(by_32) == 2
    assert not set(by_16) & set(by_32)


@pytest.mark.parametrize("parent", [-1, 2**64, "12"])
def test_tokens_bad_parent_raises(parent: Any) -> None:
    with pytest.raises(ValueError, match="parent"):
        TokenKeys().block_keys(_tokens(16), 16, parent=parent)


# --- vllm mode: continuing chains and self-checks ------------------------------------------


def test_vllm_unknown_parent_raises() -> None:
    tokens = _tokens(4 * BLOCK)
    first = VllmKeys().block_keys(tokens[:BLOCK], BLOCK)
    keyer = VllmKeys()
    keyer.block_keys(tokens[:BLOCK], BLOCK)  # not remembered by default
    with pytest.raises(UnknownParent) as info:
        keyer.block_keys(tokens[BLOCK:], BLOCK, parent=first[0])
    assert info.value.parent == first[0]
    assert keyer.remembered == 0


def test_check_published_follows_an_engine_chain(capture: dict[str, Any]) -> None:
    tokens, published = capture["token_ids"], capture["block_hashes"]
    keyer = VllmKeys("sha256_cbor", "42")
    parent = None
    # The engine publishes a prompt as several BlockStored events, each naming its parent;
    # decoded events carry tuples.
    for first, last in [(0, 5), (5, 6), (6, 20), (20, 25)]:
        event_tokens = tuple(tokens[first * BLOCK : last * BLOCK])
        event_hashes = tuple(published[first:last])
        check = keyer.check_published(event_tokens, BLOCK, event_hashes, parent=parent)
        assert check is HashCheck.MATCH
        parent = published[last - 1]
    assert keyer.remembered == 25


def test_check_published_reports_a_mismatch(capture: dict[str, Any]) -> None:
    tokens, published = capture["token_ids"][: 5 * BLOCK], capture["block_hashes"][:5]
    wrong_seed = VllmKeys("sha256_cbor", "43")
    assert wrong_seed.check_published(tokens, BLOCK, published) is HashCheck.MISMATCH
    assert wrong_seed.remembered == 0
    one_off = [*published[:4], published[4] ^ 1]
    right = VllmKeys("sha256_cbor", "42")
    assert right.check_published(tokens, BLOCK, one_off) is HashCheck.MISMATCH


def test_check_published_cannot_check_an_unknown_parent(capture: dict[str, Any]) -> None:
    tokens, published = capture["token_ids"], capture["block_hashes"]
    keyer = VllmKeys("sha256_cbor", "42")
    check = keyer.check_published(tokens[5 * BLOCK :], BLOCK, published[5:], parent=published[4])
    assert check is HashCheck.UNKNOWN_PARENT


def test_check_published_rejects_a_malformed_event(capture: dict[str, Any]) -> None:
    tokens, published = capture["token_ids"], capture["block_hashes"]
    keyer = VllmKeys("sha256_cbor", "42")
    with pytest.raises(ValueError, match="do not make 3 blocks"):
        keyer.check_published(tokens[: 2 * BLOCK], BLOCK, published[:3])
    with pytest.raises(ValueError, match="block_size"):
        keyer.check_published(tokens[:BLOCK], "16", published[:1])  # type: ignore[arg-type]


def test_remembered_digests_are_bounded_and_keep_those_in_use() -> None:
    keyer = VllmKeys(max_parents=8)
    system_prompt = keyer.block_keys(_tokens(BLOCK, start=1), BLOCK, remember=True)
    others = []
    for i in range(40):
        others.append(keyer.block_keys(_tokens(BLOCK, start=100 + i), BLOCK, remember=True)[0])
        assert keyer.remembered <= 8
        # A parent used now and then (a shared system prompt) is not forgotten.
        keyer.block_keys(_tokens(BLOCK), BLOCK, parent=system_prompt[0])
    with pytest.raises(UnknownParent):
        keyer.block_keys(_tokens(BLOCK), BLOCK, parent=others[0])
    keyer.block_keys(_tokens(BLOCK), BLOCK, parent=others[-1])


def test_max_parents_must_hold_a_chain() -> None:
    with pytest.raises(ValueError, match="max_parents"):
        VllmKeys(max_parents=1)


# --- factory ---------------------------------------------------------------------------


def test_make_keyer_builds_the_configured_scheme() -> None:
    tokens_keyer: BlockKeyer = make_keyer("tokens")
    assert isinstance(tokens_keyer, TokenKeys)
    assert tokens_keyer.key_mode == "tokens"
    vllm_keyer = make_keyer("vllm", "sha256_cbor", 42)
    assert isinstance(vllm_keyer, VllmKeys)
    assert (vllm_keyer.key_mode, vllm_keyer.algorithm, vllm_keyer.seed) == (
        "vllm",
        "sha256_cbor",
        "42",
    )
    unseeded = make_keyer("vllm")
    assert isinstance(unseeded, VllmKeys)
    assert unseeded.seed == "vllm-none-hash"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("lru",), "'lru'"),
        (("vllm", "md5"), "'md5'"),
        (("tokens", "sha-256"), "'sha-256'"),
        (("vllm", "sha256", 4.2), "4.2"),
        (("vllm", "sha256", True), "True"),
    ],
)
def test_make_keyer_rejects_bad_settings_by_name(args: tuple[Any, ...], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_keyer(*args)
