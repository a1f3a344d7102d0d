"""When do an indexer's answers show what the pods published? A polling thread per indexer
asks for each pod's target prompt until that pod matches it, and notes when."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from loadtest.vs_dynamo.clients import RawHttp
from loadtest.vs_dynamo.indexers import HttpQuery, Indexer

__all__ = ["Deadline", "Targets", "join", "watch"]

Targets = Mapping[int, tuple[Sequence[int], int]]
"""pod -> (token ids to ask for, blocks of them the pod must match)."""
_POLL_INTERVAL = 0.01


class Deadline:
    """A monotonic deadline another thread may move."""

    def __init__(self, at: float) -> None:
        self.at = at


def _poll(
    query: HttpQuery,
    targets: Targets,
    deadline: Deadline,
    seen: dict[int, float],
) -> None:
    """Query each pod's target prompt, one pod after another, until that pod matches at
    least the wanted blocks; ``seen[pod]`` = when it first did (monotonic). One query in
    flight every ``_POLL_INTERVAL`` at most, so the polling itself costs the indexer little;
    the last pod's time is within an interval of the latest of all. Ends at the deadline."""
    client = RawHttp(query.port, timeout=10.0)
    requests = {pod: RawHttp.request(query.path, query.body(t)) for pod, (t, _) in targets.items()}
    try:
        for pod in sorted(targets):
            while time.monotonic() < deadline.at:
                try:
                    answer = client.send(requests[pod])
                except (OSError, ValueError, RuntimeError):
                    time.sleep(0.05)  # busy or restarting: try again
                    continue
                if query.matches(answer).get(pod, 0) >= targets[pod][1]:
                    seen[pod] = time.monotonic()
                    break
                time.sleep(_POLL_INTERVAL)
    finally:
        client.close()


def watch(
    indexers: Sequence[Indexer],
    targets: Targets,
    deadline: Deadline,
) -> tuple[list[threading.Thread], dict[str, dict[int, float]]]:
    """A polling thread per indexer (started); their findings by indexer name."""
    seen: dict[str, dict[int, float]] = {ix.name: {} for ix in indexers}
    threads = [
        threading.Thread(
            target=_poll,
            args=(ix.query, targets, deadline, seen[ix.name]),
            name=f"visible-{ix.name}",
            daemon=True,
        )
        for ix in indexers
    ]
    for thread in threads:
        thread.start()
    return threads, seen


def join(threads: Sequence[threading.Thread], deadline: Deadline) -> None:
    for thread in threads:
        thread.join(max(0.0, deadline.at - time.monotonic()) + 30.0)
