"""The query clients: gRPC over one ``grpc.aio`` channel, REST over a keep-alive
``httpx.AsyncClient``, and REST over a minimal HTTP/1.1 client (``rest-raw``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence

import grpc
import httpx

from loadtest.service_bench.daemon import Daemon
from loadtest.service_bench.workload import MODEL
from service.api.generated.kvcache.v1 import kvcache_pb2, kvcache_pb2_grpc
from service.client._wire import pack_token_ids

__all__ = ["QueryClients", "RawHttp"]


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client on one connection, for comparison: what the
    server costs when the client costs next to nothing (httpx spends ~1.4 ms of CPU per
    8192-token request on this machine)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes, *, body: bool = False) -> tuple[int, bytes]:
        """Send a prepared request, read the whole answer: (status, body if asked)."""
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(request)
        header = await self._reader.readuntil(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        content = await self._reader.readexactly(length)
        return status, content if body else b""

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()


class QueryClients:
    """The query of one prompt, prepared once for each client; ``call(api)`` is one request
    by worker ``n`` (its own raw connection), True when it was answered 200 / OK. Made
    inside the event loop (the gRPC channel binds to it)."""

    def __init__(self, daemon: Daemon, prompt: Sequence[int], workers: int) -> None:
        self._port = daemon.http_port
        self._rest_body = json.dumps({"model": MODEL, "token_ids": prompt}).encode()
        self._raw_request = RawHttp.request("/v1/locality", self._rest_body)
        # Packed token ids, as service.client sends them (8192 varints cost ~0.2 ms more).
        self._grpc_request = kvcache_pb2.LocalityRequest(
            model=MODEL, token_ids_packed=pack_token_ids(prompt)
        )
        self._http = httpx.AsyncClient(
            base_url=daemon.base_url,
            timeout=10.0,
            limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
            headers={"content-type": "application/json"},
        )
        self._channel = grpc.aio.insecure_channel(daemon.grpc_target)
        self._stub = kvcache_pb2_grpc.KVCacheServiceStub(self._channel)
        self._raw = [RawHttp(self._port) for _ in range(workers)]

    async def grpc_ready(self, within: float) -> str | None:
        """Wait for the gRPC channel; what went wrong, or None when it is ready."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), within)
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            return f"channel not ready: {error!r}"
        return None

    async def rest_matches(self) -> dict[str, int]:
        """pod -> match length of the pods holding part of the prompt (REST, httpx)."""
        response = await self._http.post("/v1/locality", content=self._rest_body)
        response.raise_for_status()
        answer = response.json()
        return {p["pod_id"]: p["match_length"] for p in answer["pods"] if p["match_length"]}

    async def grpc_matches(self) -> tuple[dict[str, int], int]:
        """pod -> match length, as for REST, and the prompt's total blocks (gRPC)."""
        reply = await self._stub.Locality(self._grpc_request, timeout=5.0)
        return {p.pod_id: p.match_length for p in reply.pods if p.match_length}, reply.total_blocks

    async def aclose(self) -> None:
        for raw in self._raw:
            await raw.close()
        await self._channel.close()
        await self._http.aclose()

    def call(self, api: str) -> Callable[[int], Awaitable[bool]]:
        return {"grpc": self._grpc_once, "rest": self._rest_once, "rest-raw": self._raw_once}[api]

    async def _grpc_once(self, worker: int) -> bool:
        try:
            await self._stub.Locality(self._grpc_request, timeout=5.0)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def _rest_once(self, worker: int) -> bool:
        try:
            response = await self._http.post("/v1/locality", content=self._rest_body)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _raw_once(self, worker: int) -> bool:
        try:
            return (await self._raw[worker].send(self._raw_request))[0] == 200
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self._raw[worker] = RawHttp(self._port)
            return False
