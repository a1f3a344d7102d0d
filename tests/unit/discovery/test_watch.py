"""Pod discovery against a stand-in API server speaking the real list+watch protocol over HTTP.

pytest-asyncio is not a dependency: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from service.config import DiscoverySettings
from service.dataplane.protocol import DataPlaneKind
from service.discovery import PodWatcher
from service.discovery.watch import Backoff
from service.events.subscriber import PodEndpoint
from tests.support.kube_api import KubeApiServer
from tests.support.planes import make_plane
from tests.support.vllm_wire import encode_batch, stored

GRACE = 0.4
MODEL = "qwen/qwen3"


class Recorder:
    """Stands in for the data plane (its sockets and its forgetting): records what discovery
    asks, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.times: list[float] = []
        self.subscribed: dict[str, PodEndpoint] = {}

    def connect(self, pod: PodEndpoint) -> None:
        self._note("connect", pod.pod_id)
        self.subscribed[pod.pod_id] = pod

    def disconnect(self, pod_id: str) -> None:
        self._note("disconnect", pod_id)
        self.subscribed.pop(pod_id, None)

    async def forget_pod(self, pod_id: str) -> None:
        self._note("forget", pod_id)

    def _note(self, call: str, pod_id: str) -> None:
        self.calls.append((call, pod_id))
        self.times.append(time.monotonic())


async def eventually(check: Callable[[], object], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching(
    server: KubeApiServer,
    subscriber: Any = None,
    *,
    forgetter: Any = None,
    backoff_initial: float = 0.05,
    watch_timeout: int = 30,
    reserved: Iterable[str] = (),
    **settings: Any,
) -> AsyncIterator[tuple[Recorder, PodWatcher]]:
    """A running PodWatcher pointed at ``server`` (started already); the recorder stands in
    for ``subscriber`` and ``forgetter`` where they are not given."""
    recorder = Recorder()
    config = DiscoverySettings(
        enabled=True,
        api_url=server.url,
        **{"namespace": "default", "not_ready_grace": GRACE, **settings},
    )
    watcher = PodWatcher(
        config,
        recorder if subscriber is None else subscriber,
        recorder if forgetter is None else forgetter,
        reserved=reserved,
        backoff_initial=backoff_initial,
        watch_timeout=watch_timeout,
    )
    watcher.start()
    try:
        yield recorder, watcher
    finally:
        await watcher.stop()


@contextlib.asynccontextmanager
async def api_server(port: int = 0) -> AsyncIterator[KubeApiServer]:
    server = KubeApiServer()
    await server.start(port)
    try:
        yield server
    finally:
        await server.close()


def test_ready_pods_are_subscribed_at_their_endpoints() -> None:
    async def main() -> None:
        async with api_server() as server:
            gpu = {"app": "vllm", "tier": "gpu"}
            model = {"kv-cache/model": MODEL}
            server.put_pod("vllm-0", ip="10.1.0.5", namespace="llm", labels=gpu, annotations=model)
            server.put_pod("vllm-cpu", ip="10.1.0.6", namespace="llm", labels={"app": "vllm"})
            server.put_pod("elsewhere", ip="10.1.0.7", namespace="default", labels=gpu)
            server.put_pod("starting", ip="10.1.0.8", namespace="llm", labels=gpu, ready=False)
            server.put_pod("pending", ip=None, namespace="llm", labels=gpu)
            selected = watching(server, namespace="llm", label_selector="app=vllm,tier=gpu")
            async with selected as (recorder, _):
                await eventually(lambda: recorder.calls, "the first subscription")
                assert recorder.subscribed == {
                    "10.1.0.5:8000": PodEndpoint(
                        "10.1.0.5:8000", "tcp://10.1.0.5:5557", "tcp://10.1.0.5:5558", MODEL, 1
                    )
                }
                # Pods that appear or turn Ready later arrive through the watch.
                server.set_ready("starting", True, namespace="llm")
                server.put_pod("vllm-1", ip="10.1.0.9", namespace="llm", labels=gpu)
                await eventually(lambda: len(recorder.subscribed) == 3, "the watched pods")
                assert set(recorder.subscribed) == {
                    "10.1.0.5:8000",
                    "10.1.0.8:8000",
                    "10.1.0.9:8000",
                }
                assert recorder.subscribed["10.1.0.9:8000"].model is None  # the topic names it
            (listed, *_) = server.seen("list")
            watched = server.seen("watch")
            assert watched
            for request in [listed, *watched]:
                assert request.namespace == "llm"
                assert request.query["labelSelector"] == "app=vllm,tier=gpu"
            assert watched[0].query["resourceVersion"] == "1005"  # the list's version

    asyncio.run(main())


def test_pod_not_ready_past_the_grace_period_is_dropped_then_back_when_ready() -> None:
    async def main() -> None:
        async with api_server() as server, watching(server) as (recorder, _):
            server.put_pod("vllm-0", ip="10.0.0.1")
            await eventually(lambda: recorder.calls, "the subscription")
            server.set_ready("vllm-0", False)
            turned = time.monotonic()
            await eventually(lambda: len(recorder.calls) == 3, "the drop", within=GRACE + 5)
            assert recorder.calls == [
                ("connect", "10.0.0.1:8000"),
                ("disconnect", "10.0.0.1:8000"),
                ("forget", "10.0.0.1:8000"),
            ]
            assert recorder.times[1] - turned >= GRACE * 0.9
            server.set_ready("vllm-0", True)
            await eventually(lambda: len(recorder.calls) == 4, "the new subscription")
            assert recorder.calls[3] == ("connect", "10.0.0.1:8000")

    asyncio.run(main())


def test_short_not_ready_spell_keeps_the_subscription_and_entries() -> None:
    async def main() -> None:
        async with api_server() as server, watching(server) as (recorder, _):
            server.put_pod("vllm-0", ip="10.0.0.1")
            await eventually(lambda: recorder.calls, "the subscription")
            server.set_ready("vllm-0", False)  # e.g. the engine container restarts
            await asyncio.sleep(GRACE / 4)
            server.set_ready("vllm-0", True)
            await asyncio.sleep(GRACE * 1.5)
            assert recorder.calls == [("connect", "10.0.0.1:8000")]

    asyncio.run(main())


def test_deleted_pod_is_dropped_at_once() -> None:
    async def main() -> None:
        async with api_server() as server, watching(server, not_ready_grace=60) as (recorder, _):
            server.put_pod("vllm-0", ip="10.0.0.1")
            server.put_pod("vllm-1", ip="10.0.0.2")
            await eventually(lambda: len(recorder.calls) == 2, "the subscriptions")
            server.delete_pod("vllm-0")
            await eventually(lambda: len(recorder.calls) == 4, "the drop", within=2)
            assert recorder.calls[2:] == [
                ("disconnect", "10.0.0.1:8000"),
                ("forget", "10.0.0.1:8000"),
            ]
            assert set(recorder.subscribed) == {"10.0.0.2:8000"}

    asyncio.run(main())


def test_gone_410_lists_again_and_drops_pods_deleted_meanwhile() -> None:
    async def main() -> None:
        async with api_server() as server, watching(server) as (recorder, _):
            server.put_pod("vllm-0", ip="10.0.0.1")
            server.put_pod("vllm-1", ip="10.0.0.2")
            await eventually(lambda: len(recorder.calls) == 2, "the subscriptions")
            await eventually(lambda: server.open_watches, "an open watch")
            watches = len(server.seen("watch"))
            # While the watch is down the history moves on and is compacted: vllm-1 is
            # deleted and a new pod gets its IP (so its pod id too).
            server.break_watches()
            server.delete_pod("vllm-1")
            server.put_pod("vllm-2", ip="10.0.0.2")
            server.put_pod("vllm-3", ip="10.0.0.3")
            server.compact()
            await eventually(lambda: len(server.seen("list")) == 2, "a second list")
            await eventually(lambda: len(recorder.calls) == 6, "the reconciliation")
            resumed = server.seen("watch")[watches]
            assert int(resumed.query["resourceVersion"]) < server.version  # got 410 Gone
            assert recorder.calls[2:] == [
                ("disconnect", "10.0.0.2:8000"),
                ("forget", "10.0.0.2:8000"),
                ("connect", "10.0.0.2:8000"),
                ("connect", "10.0.0.3:8000"),
            ]
            assert set(recorder.subscribed) == {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
            # After the list, the watch goes on from the list's version.
            await eventually(lambda: len(server.seen("watch")) > watches + 1, "a new watch")
            assert server.seen("watch")[-1].query["resourceVersion"] == str(server.version)

    asyncio.run(main())


def test_broken_stream_resumes_from_the_last_version_after_a_backoff() -> None:
    async def main() -> None:
        async with (
            api_server() as server,
            watching(server, backoff_initial=0.2) as (recorder, _),
        ):
            await eventually(lambda: server.open_watches, "an open watch")
            server.put_pod("vllm-0", ip="10.0.0.1")  # comes by the watch: a newer version
            await eventually(lambda: recorder.calls, "the subscription")
            version = server.version
            server.break_watches()
            broken = time.monotonic()
            await eventually(lambda: len(server.seen("watch")) == 2, "the watch to resume")
            first, resumed = server.seen("watch")
            assert int(first.query["resourceVersion"]) < version
            assert resumed.query["resourceVersion"] == str(version)
            assert resumed.at - broken >= 0.2 * 0.5  # the backoff's shortest first delay
            assert len(server.seen("list")) == 1  # resumed, not listed again
            server.put_pod("vllm-1", ip="10.0.0.2")
            await eventually(lambda: len(recorder.calls) == 2, "events after the resume")

    asyncio.run(main())


def test_refused_requests_are_retried_with_growing_capped_delays() -> None:
    async def main() -> None:
        async with (
            api_server() as server,
            watching(server, backoff_initial=0.05, resync_backoff_max=0.2) as (recorder, _),
        ):
            server.put_pod("vllm-0", ip="10.0.0.1")
            await eventually(lambda: recorder.calls, "the subscription")
            server.refuse(503)
            await eventually(lambda: server.open_watches, "an open watch")
            server.break_watches()
            broken = time.monotonic()
            await eventually(lambda: len(server.requests) >= 9, "retries")
            times = [broken] + [request.at for request in server.requests[2:9]]
            delays = [b - a for a, b in itertools.pairwise(times)]
            # 0.05, 0.1, then the 0.2 cap; each scaled by a jitter factor in [0.5, 1].
            # Upper bounds with room for a slow machine; uncapped, the last would be >= 1.6.
            assert delays[0] < 0.1
            assert min(delays[-3:]) >= 0.1 * 0.95
            assert max(delays) < 0.5
            assert set(recorder.subscribed) == {"10.0.0.1:8000"}  # kept meanwhile
            server.refuse(None)
            server.put_pod("vllm-1", ip="10.0.0.2")
            await eventually(lambda: len(recorder.calls) == 2, "recovery")

    asyncio.run(main())


def test_gone_again_right_after_a_list_backs_off_instead_of_spinning() -> None:
    async def main() -> None:
        async with (
            api_server() as server,
            watching(server, backoff_initial=0.05, resync_backoff_max=0.2) as (recorder, _),
        ):
            server.put_pod("vllm-0", ip="10.0.0.1")
            await eventually(lambda: recorder.calls, "the subscription")
            await eventually(lambda: server.open_watches, "an open watch")
            lists = len(server.seen("list"))
            server.always_gone = True
            server.break_watches()
            await asyncio.sleep(0.6)
            # Backing off: a handful of lists (waits of 0.05, 0.1, 0.2, 0.2, ... at most
            # halved by jitter), not hundreds.
            assert 2 <= len(server.seen("list")) - lists <= 12
            assert recorder.calls == [("connect", "10.0.0.1:8000")]

    asyncio.run(main())


def test_watch_ended_by_the_server_timeout_resumes_without_listing() -> None:
    async def main() -> None:
        async with api_server() as server, watching(server, watch_timeout=1) as (recorder, _):
            await eventually(lambda: server.open_watches, "the first watch")
            # A change elsewhere moves the version; a bookmark tells the watcher.
            server.put_pod("other", ip="10.9.0.1", namespace="elsewhere")
            server.bookmark()
            await eventually(lambda: len(server.seen("watch")) == 2, "the next watch", 5)
            first, second = server.seen("watch")
            assert first.query["timeoutSeconds"] == second.query["timeoutSeconds"] == "1"
            assert second.at - first.at >= 0.9
            assert second.query["resourceVersion"] == str(server.version)
            assert len(server.seen("list")) == 1
            server.put_pod("vllm-0", ip="10.0.0.1")
            await eventually(lambda: recorder.calls, "events on the next watch")

    asyncio.run(main())


def test_api_server_down_at_start_is_retried_until_it_answers() -> None:
    async def main() -> None:
        port = _free_ports(1)
        server = KubeApiServer()
        server.url = f"http://127.0.0.1:{port}"
        async with watching(server) as (recorder, _):
            await asyncio.sleep(0.3)  # several refused connections meanwhile
            server.put_pod("vllm-0", ip="10.0.0.1")
            await server.start(port)
            try:
                await eventually(lambda: recorder.calls, "the subscription")
            finally:
                await server.close()

    asyncio.run(main())


def test_without_api_url_the_kubeconfig_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with api_server() as server:
            kubeconfig = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server.url}}],
                "users": [{"name": "dev", "user": {"token": "s3cret"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "dev"}}],
                "current-context": "test",
            }
            path = tmp_path / "kubeconfig"
            path.write_text(json.dumps(kubeconfig), encoding="utf-8")
            monkeypatch.setenv("KUBECONFIG", str(path))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            server.put_pod("vllm-0", ip="10.0.0.1")
            recorder = Recorder()
            settings = DiscoverySettings(enabled=True, namespace="default")
            watcher = PodWatcher(settings, recorder, recorder)
            watcher.start()
            try:
                await eventually(lambda: recorder.calls, "the subscription")
            finally:
                await watcher.stop()
            assert server.requests[0].authorization == "Bearer s3cret"

    asyncio.run(main())


def test_pod_ids_configured_in_zmq_pods_are_left_alone() -> None:
    async def main() -> None:
        async with (
            api_server() as server,
            watching(server, reserved=["10.0.0.1:8000"]) as (recorder, watcher),
        ):
            server.put_pod("vllm-0", ip="10.0.0.1")
            server.put_pod("vllm-1", ip="10.0.0.2")
            await eventually(lambda: recorder.calls, "the subscription")
            server.delete_pod("vllm-0")
            server.delete_pod("vllm-1")
            await eventually(lambda: len(recorder.calls) == 3, "the drop")
            assert {pod_id for _, pod_id in recorder.calls} == {"10.0.0.2:8000"}
            assert watcher.reconciler.subscribed == {}

    asyncio.run(main())


def test_data_parallel_annotation_subscribes_every_rank_over_zeromq(kind: DataPlaneKind) -> None:
    """A real data plane and PUB sockets: each rank's frames arrive named by the discovery,
    and the pod's deletion drops what it stored."""

    async def main() -> None:
        port = _free_ports(2)
        context = zmq.asyncio.Context()
        publishers = []
        for rank in range(2):
            pub = context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(f"tcp://127.0.0.1:{port + rank}")
            publishers.append(pub)
        plane = make_plane(kind, context=context)
        await plane.start()
        seqs = [0, 0]
        try:
            async with (
                api_server() as server,
                watching(server, plane, forgetter=plane, event_port=port, replay_port=None),
            ):
                annotations = {"kv-cache/model": MODEL, "kv-cache/data-parallel-size": "2"}
                server.put_pod("vllm-0", ip="127.0.0.1", annotations=annotations)

                async def ranks_heard() -> bool:
                    for rank, pub in enumerate(publishers):  # PUB drops until SUB joins
                        # The topic names nobody and the batch no rank: discovery names both.
                        block = stored([rank + 1], list(range(16 * rank, 16 * rank + 16)))
                        payload = encode_batch([block], version="0.33", dp_rank=None)
                        pub.send_multipart([b"kv@", seqs[rank].to_bytes(8, "big"), payload])
                        seqs[rank] += 1
                    pods = await plane.pods()
                    return [(p.pod_id, p.dp_rank, p.model) for p in pods] == [
                        ("127.0.0.1:8000", rank, MODEL) for rank in (0, 1)
                    ]

                await eventually_async(ranks_heard, "frames from both ranks")
                found = await plane.lookup(MODEL, token_ids=range(16, 32))
                assert [str(p.pod) for p in found.pods] == ["127.0.0.1:8000@dp1"]
                server.delete_pod("vllm-0")

                async def dropped() -> bool:
                    return await plane.pods() == []

                await eventually_async(dropped, "the drop")
                assert (await plane.lookup(MODEL, token_ids=range(16, 32))).pods == []
        finally:
            await plane.stop()
            for pub in publishers:
                pub.close()
            context.term()

    asyncio.run(main())


async def eventually_async(
    check: Callable[[], Awaitable[bool]], what: str, within: float = 5.0
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets() -> None:
    low = Backoff(0.5, 4.0, random_unit=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    high = Backoff(0.5, 4.0, random_unit=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    high.reset()
    assert high.next() == 0.5
    assert Backoff(10.0, 1.0, random_unit=lambda: 1.0).next() == 1.0


def _free_ports(count: int) -> int:
    """A port p on 127.0.0.1 such that p .. p + count - 1 are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        with contextlib.ExitStack() as stack:
            try:
                for offset in range(count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", base + offset))
            except OSError:
                continue
            return base
    raise AssertionError("no free consecutive ports")
