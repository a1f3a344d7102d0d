"""Our daemon (``kv-cache serve``, run as ``python -m service serve --config FILE`` in this
checkout, or another one given as ``root``) as a subprocess, in connect mode: it connects to
every pod's PUB and replay sockets, as Dynamo does.

Config: ``zmq.endpoint: ""`` (no bind mode), ``zmq.topic_filter: ""`` (the pods publish on
vLLM's default empty topic), ``zmq.pods: [{pod_id: "pod-<i>", endpoint, replay_endpoint,
model}]``, ``index.max_size`` above every block sent, HTTP and gRPC on free ports of
127.0.0.1. Query: ``POST /v1/locality`` ``{"model": MODEL, "token_ids": [...]}``, or gRPC
``kvcache.v1.KVCacheService/Locality`` through ``service.client``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.vs_dynamo.indexers import HttpQuery, PodEndpoint
from loadtest.vs_dynamo.procs import Service, wait_http
from loadtest.vs_dynamo.workload import MODEL

__all__ = ["OurDaemon", "grpc_matches", "matches", "pod_id", "query_body"]

ROOT = Path(__file__).resolve().parents[2]


def pod_id(pod: int) -> str:
    return f"pod-{pod}"


def query_body(token_ids: Sequence[int]) -> dict[str, Any]:
    return {"model": MODEL, "token_ids": list(token_ids)}


def matches(answer: Any) -> dict[int, int]:
    """pod -> match length in blocks, from a ``/v1/locality`` answer (rank 0 only: no DP)."""
    return {
        int(entry["pod_id"].removeprefix("pod-")): int(entry["match_length"])
        for entry in answer.get("pods", [])
        if not entry.get("dp_rank")
    }


def grpc_matches(answer: Any) -> dict[int, int]:
    """The same from ``service.client``'s ``Locality`` (the gRPC answer)."""
    return {
        int(pod.pod_id.removeprefix("pod-")): int(pod.match_length)
        for pod in answer.pods
        if not pod.dp_rank
    }


class OurDaemon:
    """The daemon of this checkout, configured for the pods."""

    name = "ours"

    def __init__(
        self,
        *,
        http_port: int,
        grpc_port: int,
        pods: Sequence[PodEndpoint],
        max_size: int,
        workdir: Path,
        root: Path = ROOT,
    ) -> None:
        self.config: dict[str, Any] = {
            "api": {"host": "127.0.0.1", "port": http_port},
            "grpc": {"host": "127.0.0.1", "port": grpc_port},
            "zmq": {
                "endpoint": "",
                "topic_filter": "",
                "pods": [
                    {
                        "pod_id": pod_id(p.pod),
                        "endpoint": p.endpoint,
                        **({"replay_endpoint": p.replay_endpoint} if p.replay_endpoint else {}),
                        "model": MODEL,
                    }
                    for p in pods
                ],
            },
            "index": {"max_size": max_size},
            "logging": {"level": "info", "format": "json"},
        }
        path = workdir / "kv-cache.yaml"
        path.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_CACHE_")}
        self.service = Service(
            "ours",
            [sys.executable, "-m", "service", "serve", "--config", str(path)],
            log=workdir / "kv-cache.log",
            cwd=root,  # python -m service imports the checkout it starts in
            env=env,
        )
        self.base_url = f"http://127.0.0.1:{http_port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.query = HttpQuery(http_port, "/v1/locality", query_body, matches)

    def wait_ready(self, timeout: float) -> None:
        wait_http(self.service, f"{self.base_url}/readyz", timeout)

    def build_info(self) -> str:
        """``kv_cache_build_info``'s labels (data plane, version) if the daemon exports it,
        else what its start-up log line says (native loops, event loop), else "?"."""
        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=10.0).text
        except httpx.HTTPError:
            text = ""
        if found := re.search(r"^kv_cache_build_info\{([^}]*)\}", text, re.MULTILINE):
            return found[1]
        for line in self.service.log_tail(1_000_000).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and "native_loops" in record:
                    return (
                        f"native_loops={record['native_loops']},"
                        f" event_loop={record.get('event_loop', '?')}"
                    )
        return "?"

    def trouble_metrics(self) -> dict[str, float]:
        """``/metrics`` samples about drops, gaps, replays and decode errors, by series."""
        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=10.0).text
        except httpx.HTTPError:
            return {}
        found = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if line.startswith("kv_cache_") and re.search(r"drop|gap|replay|lost|error", name):
                with contextlib.suppress(ValueError):
                    found[name] = float(value)
        return found

    def pod_stats(self) -> dict[str, int]:
        """``/v1/pods`` summed over pods: blocks, gaps, lost batches, replays, restarts."""
        try:
            pods = httpx.get(f"{self.base_url}/v1/pods", timeout=10.0).json()["pods"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        keys = ("blocks", "batches", "gaps", "lost_batches", "replays", "restarts")
        return {k: sum(int(p.get(k) or 0) for p in pods) for k in keys}

    def log_summary(self) -> dict[str, int]:
        """Warnings and errors in the daemon's log, by message."""
        counts: dict[str, int] = {}
        for line in self.service.log_tail(50_000_000).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("warning", "error"):
                key = f"{record['level']}: {record.get('event', '?')}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        self.service.stop()
