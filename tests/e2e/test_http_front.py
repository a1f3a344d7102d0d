"""The daemon's HTTP port, served by the native front (native/http_front.cpp): the REST hot
path answered natively must equal what the Python server (FastAPI, behind the front)
answers for the same query, and every other request must reach the Python server whole,
on the same connection, whatever came before it on that connection."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.vs_dynamo.clients import read_response
from tests.e2e.harness import Daemon, Engine, daemon, free_port, wait_for
from tests.support.vllm_wire import stored

MODEL = "front-model"
BLOCK = 16
TOKENS = list(range(7000, 7000 + 40 * BLOCK))
PODS = {"10.0.4.1:8000": 40, "10.0.4.2:8000": 24, "10.0.4.3:8000@dp1": 8}


@pytest.fixture(scope="module")
def running() -> Iterator[Daemon]:
    port = free_port()
    with daemon({"zmq": {"endpoint": f"tcp://127.0.0.1:{port}"}}) as bound:
        for index, (label, blocks) in enumerate(PODS.items()):
            pod, _, rank = label.partition("@dp")
            engine = Engine(f"kv@{pod}@{MODEL}", connect=f"tcp://127.0.0.1:{port}")
            try:
                engine.wait_subscribed()
                hashes = [(index + 1) << 32 | i for i in range(blocks)]
                events = [stored(hashes, TOKENS[: blocks * BLOCK], block_size=BLOCK)]
                events.append(stored(hashes[:2], [], block_size=0, medium="CPU"))
                engine.publish(events, dp_rank=int(rank or 0))
                wait_for(lambda: label in bound.matches(MODEL, TOKENS), what=label)  # noqa: B023
            finally:
                engine.close()
        yield bound


class Connection:
    """One keep-alive HTTP/1.1 connection, raw, so a test controls every byte."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.socket.makefile("rb")

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def answer(self) -> tuple[int, Any]:
        status, body = read_response(self.file)
        return status, json.loads(body) if body else None

    def close(self) -> None:
        self.file.close()
        self.socket.close()


def request(path: str, body: bytes, *, method: str = "POST", extra: str = "") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def plain(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


def relayed(**fields: Any) -> bytes:
    """The same query written so that only FastAPI reads it (an escape in the model name)."""
    text = json.dumps({"model": MODEL, **fields})
    return text.replace(f'"{MODEL}"', '"\\u0066ront-model"', 1).encode()


QUERIES: list[dict[str, Any]] = [
    {"token_ids": TOKENS},
    {"token_ids": TOKENS[: 10 * BLOCK + 3]},
    {"token_ids": TOKENS, "lora_name": "sql"},
    {"token_ids": TOKENS, "cache_salt": "salt"},
    {"token_ids": [1, 2, 3]},
    {"token_ids": []},
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("path", ["/v1/locality", "/v1/score"])
def test_native_answers_are_the_python_servers_answers(
    running: Daemon, query: dict[str, Any], path: str
) -> None:
    native, python = Connection(running.http_port), Connection(running.http_port)
    try:
        native.send(request(path, plain(**query)))
        python.send(request(path, relayed(**query)))
        assert native.answer() == python.answer()
    finally:
        native.close()
        python.close()


def test_the_hot_path_is_answered_natively_and_counted(running: Daemon) -> None:
    relayed_before = running.metric("kv_cache_relayed_requests_total", api="rest")
    queries_before = running.metric("kv_cache_query_duration_seconds_count", api="rest")
    connection = Connection(running.http_port)
    try:
        for _ in range(3):
            connection.send(request("/v1/locality", plain(token_ids=TOKENS)))
            status, answer = connection.answer()
            assert status == 200 and answer["cache_hits"] == 40
    finally:
        connection.close()
    assert running.metric("kv_cache_relayed_requests_total", api="rest") == relayed_before
    assert running.metric("kv_cache_query_duration_seconds_count", api="rest") == (
        queries_before + 3
    )


def test_a_connection_turns_to_python_at_its_first_other_request(running: Daemon) -> None:
    connection = Connection(running.http_port)
    try:
        connection.send(request("/v1/locality", plain(token_ids=TOKENS)))
        assert connection.answer()[1]["cache_hits"] == 40
        connection.send(request("/readyz", b"", method="GET"))
        assert connection.answer() == (200, {"status": "ready", "warnings": []})
        connection.send(request("/v1/locality", plain(token_ids=TOKENS[:BLOCK])))
        assert connection.answer()[1]["cache_hits"] == 1  # answered by Python, the same
    finally:
        connection.close()


def test_pipelined_requests_are_answered_in_order(running: Daemon) -> None:
    connection = Connection(running.http_port)
    try:
        connection.send(
            request("/v1/locality", plain(token_ids=TOKENS))
            + request("/v1/score", plain(token_ids=TOKENS[: 8 * BLOCK]))
            + request("/v1/locality", plain(token_ids=TOKENS, pods=["10.0.4.2:8000"]))
        )
        first, second, third = connection.answer(), connection.answer(), connection.answer()
        assert first[1]["cache_hits"] == 40
        assert second[1]["scores"] == {
            "10.0.4.1:8000": 1.0,
            "10.0.4.2:8000": 1.0,
            "10.0.4.3:8000@dp1": 1.0,
        }
        assert [p["pod_id"] for p in third[1]["pods"]] == ["10.0.4.2:8000"]  # candidates
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b'{"model": "front-model", "token_ids": [1.5]}', 422),
        (b'{"model": "", "token_ids": [1]}', 422),
        (b"not json", 400),
        (b"", 400),
        (json.dumps({"model": MODEL, "token_ids": [1] * 200_000}).encode(), 413),
    ],
)
def test_what_the_front_does_not_answer_python_answers(
    running: Daemon, data: bytes, status: int
) -> None:
    connection = Connection(running.http_port)
    try:
        connection.send(request("/v1/locality", data))
        got, body = connection.answer()
        assert got == status, body
        assert body["detail"]
    finally:
        connection.close()


def test_expect_continue_and_connection_close(running: Daemon) -> None:
    connection = Connection(running.http_port)
    try:
        body = plain(token_ids=TOKENS)
        head = request("/v1/locality", b"", extra="Expect: 100-continue\r\n")
        head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
        connection.send(head)
        assert connection.file.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert connection.file.readline() == b"\r\n"
        connection.send(body)
        assert connection.answer()[1]["cache_hits"] == 40
        connection.send(request("/v1/locality", body, extra="Connection: close\r\n"))
        assert connection.answer()[1]["cache_hits"] == 40
        assert connection.file.read() == b""  # closed after the answer
    finally:
        connection.close()


def test_a_chunked_body_goes_to_python(running: Daemon) -> None:
    connection = Connection(running.http_port)
    try:
        body = plain(token_ids=TOKENS)
        head = (
            b"POST /v1/locality HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        connection.send(head)
        status, answer = connection.answer()
        assert status == 200 and answer["cache_hits"] == 40
    finally:
        connection.close()
