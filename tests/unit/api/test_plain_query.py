"""The REST fast path for token-id bodies (``_plain_query``, over the native body reader
``service._dataplane.parse_plain_locality``) against the validated path: whatever it
accepts, the pydantic model accepts alike and reads the same query from."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api import rest
from service.api.rest_models import LocalityRequest

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
def test_token_ids_are_read_from_json_arrays(tokens: list[int], pad: str) -> None:
    text = pad + "[" + pad + ("," + pad).join(map(str, tokens)) + pad + "]" + pad
    query = rest._plain_query(b'{"model": "m", "token_ids": ' + text.encode() + b"}")
    assert query is not None and list(query.token_ids or ()) == tokens


@pytest.mark.parametrize(
    "tokens", [b"[1.0]", b"[01]", b"[-1]", b"[4294967296]", b"[1,]", b"[1", b"", b"[1 2]", b"[1e3]"]
)
def test_token_ids_written_otherwise_take_the_validated_path(tokens: bytes) -> None:
    assert rest._plain_query(b'{"model": "m", "token_ids": ' + tokens + b"}") is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "token_ids": [1], "model": "n"}',  # a key twice
        b'{"model": "m\\u0041", "token_ids": [1]}',  # an escape
        b'{"model": "m\x01", "token_ids": [1]}',  # a control character
        b'{"model": "\xff", "token_ids": [1]}',  # not UTF-8
        b'{"model": "", "token_ids": [1]}',
        b'{"token_ids": [1]}',
        b'{"model": "m", "token_ids": [1], "prompt": "x"}',
        b'{"model": "m", "token_ids": [1]} x',
        b'[{"model": "m", "token_ids": [1]}]',
    ],
)
def test_bodies_of_any_other_shape_take_the_validated_path(raw: bytes) -> None:
    assert rest._plain_query(raw) is None


_TEXT = st.text(st.characters(codec="utf-8"), max_size=8)


@settings(max_examples=500)
@given(
    body=st.fixed_dictionaries(
        {"model": _TEXT, "token_ids": st.lists(_TOKEN, max_size=4)},
        optional={"lora_name": _TEXT | st.none(), "cache_salt": _TEXT | st.none(),
                  "pods": st.lists(_TEXT, max_size=2) | st.none()},
    ),
    ascii_only=st.booleans(),
    cut=st.integers(0, 200),
    flip=st.integers(0, 255),
)  # fmt: skip
def test_garbled_bodies_are_refused_or_read_as_the_validated_path_reads_them(
    body: dict[str, Any], ascii_only: bool, cut: int, flip: int
) -> None:
    raw = bytearray(json.dumps(body, ensure_ascii=ascii_only).encode())
    if cut < len(raw):
        raw[cut] ^= flip  # one byte garbled (flip 0: the body as written)
    fast = rest._plain_query(bytes(raw))
    if fast is None:
        return
    validated = _validated(bytes(raw))
    assert validated is not None, raw
    assert fast.model == validated["model"]
    assert list(fast.token_ids or ()) == validated["token_ids"]
    assert (fast.lora_name, fast.cache_salt, fast.pods) == (
        validated.get("lora_name"),
        validated.get("cache_salt"),
        validated.get("pods"),
    )
