"""Builds the data plane the settings ask for (``data_plane``: native by default)."""

from __future__ import annotations

import zmq.asyncio

from service.config import Settings
from service.dataplane.native import NativeDataPlane
from service.dataplane.protocol import DataPlane
from service.dataplane.python import PythonDataPlane
from service.dataplane.replays import ReplayRunner
from service.events.replay import Replayer
from service.index.reference import ReferenceIndex
from service.telemetry import Metrics

__all__ = ["create_data_plane"]


def create_data_plane(
    settings: Settings, metrics: Metrics, context: zmq.asyncio.Context
) -> DataPlane:
    """The native plane, or the Python reference when ``data_plane: python``.

    Replays are fetched from the event loop's ZeroMQ ``context`` in both.
    """
    replays = ReplayRunner(
        Replayer(context, timeout=settings.zmq.replay_timeout),
        concurrency=settings.zmq.replay_concurrency,
        metrics=metrics,
    )
    if settings.data_plane == "python":
        index = ReferenceIndex(ttl=settings.index.ttl, max_entries=settings.index.max_size)
        return PythonDataPlane(settings, index, context, replays)
    return NativeDataPlane(settings, replays)
