"""A stand-in Kubernetes API server that knows Pods: list and watch over real HTTP.

It speaks the protocol Kubernetes clients rely on, on 127.0.0.1:
- ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...``: a ``PodList`` whose
  ``metadata.resourceVersion`` is the version to watch from;
- the same with ``watch=true&resourceVersion=N[&timeoutSeconds=T][&allowWatchBookmarks=true]``:
  a chunked stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
  "object": ...}`` with the changes after N, then live ones, ended by the server after T
  seconds. A version older than the history kept (``compact()``) gets an ``ERROR`` event
  carrying a 410 Gone ``Status``, as a real API server answers. With a label selector a
  change that makes a pod stop (start) matching is a DELETED (ADDED) event.
Every request is recorded (``requests``). To simulate trouble: ``break_watches()`` cuts the
open streams mid-chunk (the client sees a broken connection) and ``refuse(status)`` answers
every request with an error ``Status`` until ``refuse(None)``.

``threaded_kube_api()`` runs one in a thread of its own, for tests that are not async.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from aiohttp import web

__all__ = ["KubeApiServer", "Seen", "ThreadedKubeApi", "pod_object", "threaded_kube_api"]

P = ParamSpec("P")
T = TypeVar("T")
Obj = dict[str, Any]

_DEFAULT_WATCH_SECONDS = 1800


@dataclass(frozen=True)
class Seen:
    """One request the server answered."""

    kind: str
    """``list`` or ``watch``."""
    namespace: str
    query: Mapping[str, str]
    authorization: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Change:
    version: int
    type: str
    before: Obj | None
    after: Obj


class _Watch:
    def __init__(self, namespace: str, selector: Callable[[Obj], bool], bookmarks: bool) -> None:
        self.namespace = namespace
        self.matches = selector
        self.bookmarks = bookmarks
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()  # None: break the stream

    def offer(self, change: _Change) -> None:
        if change.after["metadata"]["namespace"] != self.namespace:
            return
        now = self.matches(change.after)
        before = change.before is not None and self.matches(change.before)
        if change.type == "DELETED":
            kind = "DELETED" if now else None
        elif before and now:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        else:
            kind = "DELETED" if before else None
        if kind is not None:
            self.queue.put_nowait({"type": kind, "object": change.after})


class KubeApiServer:
    """Pods, their change history and the HTTP API over them. Use from one event loop."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], Obj] = {}
        self.requests: list[Seen] = []
        self.url = ""
        self._version = 1000
        self._history: list[_Change] = []
        self._oldest = 0  # watches from an older version get 410 Gone
        self._watches: set[_Watch] = set()
        self._refusing: int | None = None
        self.always_gone = False
        """Answer every watch with 410 Gone, whatever its version (a misbehaving server)."""
        self._uids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1 (``port`` 0: a free one); returns the base URL."""
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_handler)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- pods ---------------------------------------------------------------------------

    def put_pod(
        self,
        name: str,
        *,
        ip: str | None = "10.0.0.1",
        ready: bool = True,
        namespace: str = "default",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Obj:
        """Create the pod (ADDED) or replace its labels, annotations and status (MODIFIED)."""
        key = (namespace, name)
        before = self.pods.get(key)
        uid = before["metadata"]["uid"] if before else f"uid-{next(self._uids)}"
        pod = pod_object(
            name,
            namespace=namespace,
            uid=uid,
            ip=ip,
            ready=ready,
            labels=labels or {"app": "vllm"},
            annotations=annotations or {},
        )
        self._record("MODIFIED" if before else "ADDED", before, pod)
        self.pods[key] = pod
        return pod

    def set_ready(self, name: str, ready: bool, *, namespace: str = "default") -> None:
        """Flip the pod's Ready condition (MODIFIED)."""
        before = self.pods[(namespace, name)]
        pod = json.loads(json.dumps(before))
        for condition in pod["status"]["conditions"]:
            if condition["type"] in ("Ready", "ContainersReady"):
                condition["status"] = "True" if ready else "False"
        self._record("MODIFIED", before, pod)
        self.pods[(namespace, name)] = pod

    def delete_pod(self, name: str, *, namespace: str = "default") -> None:
        """Remove the pod (DELETED)."""
        before = self.pods.pop((namespace, name))
        self._record("DELETED", before, json.loads(json.dumps(before)))

    def compact(self) -> None:
        """Forget the history so far: a watch from any version before now gets 410 Gone."""
        self._history.clear()
        self._oldest = self._version

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version to watches that allow them."""
        event = {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._version)},
            },
        }
        for watch in self._watches:
            if watch.bookmarks:
                watch.queue.put_nowait(event)

    # -- trouble --------------------------------------------------------------------------

    def break_watches(self) -> None:
        """Cut every open watch stream without ending it properly."""
        for watch in self._watches:
            watch.queue.put_nowait(None)

    def refuse(self, status: int | None) -> None:
        """Answer every request with this HTTP error status (None: serve again)."""
        self._refusing = status

    # -- what was asked -----------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def seen(self, kind: str) -> list[Seen]:
        return [request for request in self.requests if request.kind == kind]

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # -- HTTP ---------------------------------------------------------------------------

    def _record(self, kind: str, before: Obj | None, after: Obj) -> None:
        self._version += 1
        after["metadata"]["resourceVersion"] = str(self._version)
        change = _Change(self._version, kind, before, after)
        self._history.append(change)
        for watch in self._watches:
            watch.offer(change)

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        query = dict(request.query)
        watching = _parse_bool(query.get("watch", "false"))
        kind = "watch" if watching else "list"
        self.requests.append(Seen(kind, namespace, query, request.headers.get("Authorization")))
        if self._refusing is not None:
            return _status(self._refusing, "stand-in refuses")
        try:
            selector = _selector(query.get("labelSelector", ""))
        except ValueError as error:
            return _status(400, str(error))
        if not watching:
            return web.json_response(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._version)},
                    "items": [
                        pod
                        for (ns, _), pod in sorted(self.pods.items())
                        if ns == namespace and selector(pod)
                    ],
                }
            )
        seconds = int(query.get("timeoutSeconds", _DEFAULT_WATCH_SECONDS))
        bookmarks = _parse_bool(query.get("allowWatchBookmarks", "false"))
        return await self._stream(request, namespace, selector, query, seconds, bookmarks)

    async def _stream(
        self,
        request: web.Request,
        namespace: str,
        selector: Callable[[Obj], bool],
        query: Mapping[str, str],
        seconds: int,
        bookmarks: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watch = _Watch(namespace, selector, bookmarks)
        since = query.get("resourceVersion", "")
        if since in ("", "0"):
            # "Any version": the current state as ADDED events, then changes.
            for (ns, _), pod in sorted(self.pods.items()):
                if ns == namespace and selector(pod):
                    watch.queue.put_nowait({"type": "ADDED", "object": pod})
        elif int(since) < self._oldest or self.always_gone:
            gone = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {since} ({self._oldest})",
                "reason": "Expired",
                "code": 410,
            }
            await response.write(_line({"type": "ERROR", "object": gone}))
            await response.write_eof()
            return response
        else:
            for change in self._history:
                if change.version > int(since):
                    watch.offer(change)
        self._watches.add(watch)
        deadline = asyncio.get_running_loop().time() + seconds
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watch.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:
                    if request.transport is not None:  # None: the client left already
                        request.transport.close()  # mid-chunk: the client sees a broken stream
                    return response
                await response.write(_line(event))
        finally:
            self._watches.discard(watch)
        await response.write_eof()
        return response


def pod_object(
    name: str,
    *,
    namespace: str = "default",
    uid: str = "uid-0",
    ip: str | None = "10.0.0.1",
    ready: bool = True,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    """A Pod as the API serves it: Running with an IP (Pending without), Ready or not."""
    flag = "True" if ready else "False"
    status: Obj = {
        "phase": "Running" if ip else "Pending",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": flag},
            {"type": "ContainersReady", "status": flag},
            {"type": "PodScheduled", "status": "True"},
        ],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        },
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": status,
    }


def _selector(text: str) -> Callable[[Obj], bool]:
    """Equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``."""
    rules: list[tuple[str, str, str]] = []  # (operator, key, value)
    for term in filter(None, (t.strip() for t in text.split(","))):
        if " in " in term or " notin " in term or "(" in term:
            raise ValueError(f"unsupported label selector {term!r}")
        if "!=" in term:
            key, value = term.split("!=", 1)
            rules.append(("!=", key.strip(), value.strip()))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            rules.append(("=", key.strip(), value.strip()))
        elif term.startswith("!"):
            rules.append(("absent", term[1:], ""))
        else:
            rules.append(("present", term, ""))

    def holds(rule: tuple[str, str, str], labels: Mapping[str, str]) -> bool:
        operator, key, value = rule
        if operator == "=":
            return labels.get(key) == value
        if operator == "!=":
            return labels.get(key) != value
        return (key in labels) == (operator == "present")

    def matches(pod: Obj) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return all(holds(rule, labels) for rule in rules)

    return matches


def _parse_bool(text: str) -> bool:
    return text in ("1", "t", "T", "true", "True", "TRUE")


def _line(event: Obj) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _status(code: int, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
    return web.json_response({**body, "code": code}, status=code)


class ThreadedKubeApi:
    """A ``KubeApiServer`` on an event loop in its own thread; ``call`` runs on that loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-api")
        self._thread.start()
        self.server = KubeApiServer()
        self.url = self._run(self.server.start)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the server's loop (its state is not thread-safe)."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return self._run(run)

    def _run(self, coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine(), self._loop).result(10)

    def close(self) -> None:
        try:
            self._run(self.server.close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@contextlib.contextmanager
def threaded_kube_api() -> Iterator[ThreadedKubeApi]:
    """A stand-in API server serving from a thread, closed on exit."""
    api = ThreadedKubeApi()
    try:
        yield api
    finally:
        api.close()
