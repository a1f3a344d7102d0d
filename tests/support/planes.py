"""Data planes for tests: built from settings, fed wire bytes as frames, both kinds alike.

Tests that exercise the query path or sequencing run against both data planes (the native
one and the Python reference) through ``make_plane`` and ``feed``, so every behaviour a
user can see is held to the same assertions in both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq.asyncio

from service.config import Settings
from service.dataplane.native import NativeDataPlane
from service.dataplane.protocol import DataPlane, DataPlaneKind
from service.dataplane.python import PythonDataPlane
from service.events.subscriber import Frame, Source
from service.index.protocol import BlockIndex
from service.index.reference import ReferenceIndex
from tests.support.vllm_wire import RawEvent, Version, WireEvent, encode_batch

__all__ = ["PLANES", "Feeder", "make_plane", "settings_for_tests"]

PLANES: tuple[DataPlaneKind, ...] = ("native", "python")
"""Parametrize over these to hold both data planes to one test."""


def settings_for_tests(**overrides: Any) -> Settings:
    """Settings with no sockets bound or connected (tests feed frames directly)."""
    zmq_settings = {"endpoint": ""}
    zmq_settings.update(overrides.pop("zmq", {}))
    return Settings.model_validate({"zmq": zmq_settings, **overrides})


def make_plane(
    kind: DataPlaneKind,
    settings: Settings | None = None,
    *,
    index: BlockIndex | None = None,
    context: zmq.asyncio.Context | None = None,
) -> DataPlane:
    """A data plane of ``kind``, not started. ``index`` replaces the Python plane's
    reference index (e.g. one that fails); the native plane has its own."""
    settings = settings or settings_for_tests()
    if kind == "native":
        if index is not None:
            raise ValueError("the native data plane has its own index")
        return NativeDataPlane(settings, None)
    if index is None:
        index = ReferenceIndex(ttl=settings.index.ttl, max_entries=settings.index.max_size)
    return PythonDataPlane(settings, index, context or zmq.asyncio.Context.instance(), None)


class Feeder:
    """Sends a plane vLLM batches as engine streams do: per (pod, rank) sequence numbers."""

    def __init__(self, plane: DataPlane, model: str) -> None:
        self.plane = plane
        self.model = model
        self._seq: dict[tuple[str, int], int] = {}

    async def send(
        self,
        pod: str,
        *events: WireEvent | RawEvent,
        rank: int = 0,
        version: Version = "0.33",
        seq: int | None = None,
    ) -> int:
        """One batch of ``events`` from ``pod``'s rank; returns its sequence number.

        The batch names the rank too (``data_parallel_rank``), as vLLM's batches do.
        """
        key = (pod, rank)
        number = self._seq.get(key, 0) if seq is None else seq
        self._seq[key] = number + 1
        payload = encode_batch(list(events), ts=time.time(), version=version, dp_rank=rank)
        topic = f"kv@{pod}@{self.model}".encode()
        frame = Frame(Source(rank=rank), topic, number, payload, time.time())
        await self.plane.ingest_frame(frame)
        return number


@contextmanager
def running_context() -> Iterator[zmq.asyncio.Context]:
    """A ZeroMQ context for the Python plane's sockets, terminated afterwards."""
    context = zmq.asyncio.Context()
    try:
        yield context
    finally:
        context.term()
