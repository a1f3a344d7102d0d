"""What the benchmark needs of an indexer under test, whichever it is."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loadtest.vs_dynamo.procs import Service

__all__ = ["HttpQuery", "Indexer", "PodEndpoint"]


@dataclass(frozen=True)
class PodEndpoint:
    """An engine pod as the indexers are told about it."""

    pod: int
    endpoint: str  # its PUB socket, e.g. tcp://127.0.0.1:5557
    replay_endpoint: str | None


@dataclass(frozen=True)
class HttpQuery:
    """How to ask an HTTP indexer which pods hold a prompt: POST ``path`` with the JSON
    ``body(token_ids)``; ``matches(answer)`` reads pod -> match length in blocks from the
    decoded answer. Picklable (module-level functions), for the client processes."""

    port: int
    path: str
    body: Callable[[Sequence[int]], dict[str, Any]]
    matches: Callable[[Any], dict[int, int]]


class Indexer(Protocol):
    """A running indexer: its process tree and its HTTP query."""

    name: str
    service: Service
    query: HttpQuery

    def log_summary(self) -> dict[str, int]: ...

    def stop(self) -> None: ...
