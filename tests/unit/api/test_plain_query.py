"""The REST fast path for token-id bodies (``_plain_query``, over the native JSON token
reader ``service._dataplane.unpack_json_tokens``) against the validated path: whatever it
accepts, the pydantic model accepts alike and reads the same query from."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service._dataplane import unpack_json_tokens
from service.api import rest
from service.api.rest_models import LocalityRequest
from service.index.keys import TOKEN_TYPECODE

_TOKEN = st.integers(0, 2**32 - 1)
_ODD_TOKEN = st.sampled_from([-1, 2**32, 1.0, True, None, "1", 1e3])
_BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", ""])},
    optional={
        "token_ids": st.lists(_TOKEN | _ODD_TOKEN, max_size=6) | st.none(),
        "lora_name": st.sampled_from(["a", None, 3]),
        "cache_salt": st.sampled_from(["s", None]),
        "pods": st.lists(st.sampled_from(["p1", "p2@dp1"]), max_size=2) | st.none(),
        "prompt": st.just("hello"),
        "extra": st.just(1),
    },
)


def _validated(raw: bytes) -> dict[str, Any] | None:
    try:
        body = LocalityRequest.model_validate_json(raw)
    except ValueError:
        return None
    return body.model_dump(exclude_none=True)


@settings(max_examples=400)
@given(body=_BODY, spaced=st.booleans())
def test_what_the_fast_path_reads_the_validated_path_reads_alike(
    body: dict[str, Any], spaced: bool
) -> None:
    raw = json.dumps(body, separators=(", ", ": ") if spaced else (",", ":")).encode()
    fast = rest._plain_query(raw)
    if fast is None:
        return
    validated = _validated(raw)
    assert validated is not None, raw
    assert fast.model == validated["model"]
    assert list(fast.token_ids or ()) == validated["token_ids"]
    assert fast.lora_name == validated.get("lora_name")
    assert fast.cache_salt == validated.get("cache_salt")
    assert fast.pods == validated.get("pods")
    assert fast.prompt is None and fast.messages is None and fast.block_hashes is None


def test_the_common_body_takes_the_fast_path() -> None:
    raw = json.dumps({"model": "m", "token_ids": list(range(100)), "pods": ["p"]}).encode()
    query = rest._plain_query(raw)
    assert query is not None and list(query.token_ids or ()) == list(range(100))


@given(tokens=st.lists(_TOKEN, max_size=50), pad=st.sampled_from(["", " ", "\n\t"]))
def test_unpack_json_tokens_reads_json_arrays(tokens: list[int], pad: str) -> None:
    text = pad + "[" + pad + ("," + pad).join(map(str, tokens)) + pad + "]" + pad
    read = array(TOKEN_TYPECODE)
    read.frombytes(unpack_json_tokens(text.encode()))
    assert read.tolist() == tokens


@pytest.mark.parametrize(
    "raw", [b"[1.0]", b"[01]", b"[-1]", b"[4294967296]", b"[1,]", b"[1", b"", b"[1 2]", b"[1e3]"]
)
def test_unpack_json_tokens_refuses_anything_else(raw: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_json_tokens(raw)


@settings(max_examples=500)
@given(
    raw=st.binary(max_size=40)
    | st.text(alphabet='[]0123456789,-+.eE \n\t"', max_size=40).map(str.encode)
)
def test_unpack_json_tokens_reads_what_json_reads_or_raises_value_error(raw: bytes) -> None:
    try:
        packed = unpack_json_tokens(raw)
    except ValueError:
        return  # refused: the validated path reads the body instead
    read = array(TOKEN_TYPECODE)
    read.frombytes(packed)
    expected = json.loads(raw)
    assert isinstance(expected, list)
    assert all(type(t) is int and 0 <= t < 2**32 for t in expected)
    assert read.tolist() == expected
