"""NVIDIA Dynamo's standalone KV indexer (``python -m dynamo.indexer``, ai-dynamo-runtime)
as a subprocess: start, register the pods, query.

- Start: ``python -m dynamo.indexer --port PORT`` (HTTP on 0.0.0.0: hence the network
  namespace; ``--threads`` is left at Dynamo's default, 4, unless given).
- Pods: ``POST /register`` ``{"instance_id": i + 1, "endpoint": "tcp://127.0.0.1:P",
  "replay_endpoint": ..., "model_name": MODEL, "block_size": 16}`` for pod i; each starts a
  ZeroMQ SUB listener that connects to the pod (and a DEALER to its replay ROUTER, used on a
  sequence gap). ``--workers "1=tcp://...,2=..." --block-size 16 --model-name M`` does the
  same without replay endpoints.
- Query: ``POST /query`` ``{"token_ids": [...], "model_name": MODEL}`` ->
  ``{"scores": {"<id>": {"<dp_rank>": tokens}}, "frequencies": [...], "instances": {"<id>":
  {"longest_matched": tokens, "gpu": tokens, "dp": {...}, "cpu": ..., "disk": ...}}}``, counts
  in matched tokens (blocks x block size); pods matching nothing are left out. Dynamo hashes
  the query's blocks itself (xxh3 of the token ids, per block; its radix tree chains them),
  as it did the events' ``token_ids``: vLLM's block hashes only link parents and removals.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.vs_dynamo.indexers import HttpQuery, PodEndpoint
from loadtest.vs_dynamo.procs import Service, wait_http
from loadtest.vs_dynamo.workload import BLOCK_SIZE, MODEL

__all__ = ["DynamoIndexer", "instance_id", "matches", "query_body"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(r"^\S+\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+\S+: (.*)$")


def instance_id(pod: int) -> int:
    """Dynamo's worker id for pod ``pod``."""
    return pod + 1


def query_body(token_ids: Sequence[int]) -> dict[str, Any]:
    return {"token_ids": list(token_ids), "model_name": MODEL}


def matches(answer: Any) -> dict[int, int]:
    """pod -> match length in blocks (on any tier), from a ``/query`` answer."""
    found = {}
    for worker, tiers in answer.get("instances", {}).items():
        found[int(worker) - 1] = int(tiers["longest_matched"]) // BLOCK_SIZE
    return found


class DynamoIndexer:
    """The standalone indexer, started and given the pods."""

    name = "dynamo"

    def __init__(
        self,
        python: Path,
        *,
        port: int,
        pods: Sequence[PodEndpoint],
        workdir: Path,
        threads: int | None = None,
    ) -> None:
        argv = [str(python), "-m", "dynamo.indexer", "--port", str(port)]
        if threads is not None:
            argv += ["--threads", str(threads)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "RUST_LOG"))}
        self.service = Service("dynamo", argv, log=workdir / "dynamo.log", env=env)
        self.base_url = f"http://127.0.0.1:{port}"
        self.query = HttpQuery(port, "/query", query_body, matches)
        self._pods = list(pods)
        self._threads = threads

    def wait_ready(self, timeout: float) -> None:
        """Wait for ``/health``, then register every pod."""
        wait_http(self.service, f"{self.base_url}/health", timeout)
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            for pod in self._pods:
                body: dict[str, Any] = {
                    "instance_id": instance_id(pod.pod),
                    "endpoint": pod.endpoint,
                    "model_name": MODEL,
                    "block_size": BLOCK_SIZE,
                }
                if pod.replay_endpoint:
                    body["replay_endpoint"] = pod.replay_endpoint
                response = client.post("/register", json=body)
                if not response.is_success:
                    raise RuntimeError(f"dynamo /register {body}: {response.text}")

    def workers(self) -> Any:
        """``GET /workers``: each registered pod and its listener's state."""
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            return client.get("/workers").json()

    def log_summary(self) -> dict[str, int]:
        """Warnings and errors in the indexer's log, by message (its text up to a colon)."""
        counts: dict[str, int] = {}
        for line in self.service.log_tail(50_000_000).splitlines():
            found = _LOG_LINE.match(_ANSI.sub("", line))
            if found and found[1] in ("WARN", "ERROR"):
                key = f"{found[1].lower()}: {found[2].split(':', 1)[0].strip()}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        self.service.stop()
