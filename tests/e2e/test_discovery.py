"""Pod discovery in the real daemon: a stand-in Kubernetes API (in this process) lists a vLLM
pod; the daemon subscribes to the pod's PUB and replay sockets, indexes its events under the
discovered id, and drops them when the pod is deleted."""

from __future__ import annotations

from tests.e2e.harness import Engine, daemon, free_port, wait_for
from tests.support.kube_api import threaded_kube_api
from tests.support.vllm_wire import stored

MODEL = "qwen/qwen3"
PROMPT = list(range(7000, 7064))  # four blocks of 16 tokens
POD = "127.0.0.1:8000"  # the default template, {ip}:{port}


def test_discovered_pod_is_indexed_then_dropped_when_deleted() -> None:
    event_port, replay_port = free_port(), free_port()
    # The topic names neither pod nor model: discovery supplies both.
    engine = Engine(
        "kv@", bind=f"tcp://127.0.0.1:{event_port}", replay_bind=f"tcp://127.0.0.1:{replay_port}"
    )
    h = [(11 << 40) + i for i in range(4)]
    # Published before the service subscribed: only the replay on first contact brings it.
    engine.publish([stored(h[:2], PROMPT[:32])], send=False)
    try:
        with threaded_kube_api() as kube:
            kube.call(
                kube.server.put_pod,
                "vllm-0",
                ip="127.0.0.1",
                annotations={"kv-cache/model": MODEL},
            )
            config = {
                "zmq": {"endpoint": ""},
                "discovery": {
                    "enabled": True,
                    "api_url": kube.url,
                    "namespace": "default",
                    "event_port": event_port,
                    "replay_port": replay_port,
                },
            }
            with daemon(config) as running:
                engine.wait_subscribed()
                engine.publish([stored(h[2:], PROMPT[32:], parent=h[1])])
                wait_for(lambda: running.matches(MODEL, PROMPT).get(POD) == 4, what="indexed")
                assert engine.replay_requests == [0]
                pods = running.http.get("/v1/pods").json()["pods"]
                assert [(p["pod_id"], p["model"]) for p in pods] == [(POD, MODEL)]

                kube.call(kube.server.delete_pod, "vllm-0")
                wait_for(lambda: not running.matches(MODEL, PROMPT), what="entries dropped")
                assert running.http.get("/v1/pods").json()["pods"] == []
                (watch, *_) = kube.call(kube.server.seen, "watch")
                assert watch.namespace == "default"
                assert watch.query["labelSelector"] == "app=vllm"
    finally:
        engine.close()
