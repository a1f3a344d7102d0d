"""Past its byte bound the ingest buffer drops frames, and then nothing is lost silently:
each drop is counted for the pod that sent it, and the pod is resynced, from its replay
endpoint where it has one (every block comes back), else by the loss being counted and
shown (a gap, lost batches, or a stale pod and a readiness warning)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.harness import Daemon, Engine, daemon, free_port, wait_for
from tests.support.vllm_wire import encode_batch, stored

MODEL = "overflow-model"
POD = "10.0.6.1:8000"
BLOCK = 16
BLOCKS_PER_EVENT = 256  # ~20 KB a frame: a 32 KiB buffer holds one
FRAMES = 120
BUFFER = "32KiB"
PLANES = ["native", "python"]


def burst(engine: Engine) -> None:
    """FRAMES frames back to back, each a new prompt of BLOCKS_PER_EVENT blocks: encoded
    first, so that they arrive far faster than any applier takes them."""
    payloads = []
    for seq in range(FRAMES):
        hashes = [seq << 20 | i for i in range(BLOCKS_PER_EVENT)]
        tokens = [(seq * 131 + i) % 100_000 for i in range(BLOCKS_PER_EVENT * BLOCK)]
        payloads.append(encode_batch([stored(hashes, tokens, block_size=BLOCK)], ts=time.time()))
    for payload in payloads:
        engine.publish_raw(payload)


def pod_status(running: Daemon) -> dict[str, Any]:
    pods: list[dict[str, Any]] = running.http.get("/v1/pods").json()["pods"]
    found = [p for p in pods if p["pod_id"] == POD]
    return found[0] if found else {"state": "unseen", "blocks": 0, "batches": 0,
                                   "lost_batches": 0, "last_seq": None}  # fmt: skip


@pytest.mark.parametrize("plane", PLANES)
def test_frames_past_the_bound_are_counted_per_pod_and_their_loss_shown(plane: str) -> None:
    port = free_port()
    config = {
        "data_plane": plane,
        "zmq": {"endpoint": f"tcp://127.0.0.1:{port}", "buffer_bytes": BUFFER},
    }
    with daemon(config) as running:
        engine = Engine(f"kv@{POD}@{MODEL}", connect=f"tcp://127.0.0.1:{port}")
        try:
            engine.wait_subscribed()
            burst(engine)

            seen: list[dict[str, Any]] = []

            def settled() -> dict[str, Any] | None:
                # The buffer drained and the pod's figures still (the applier may hold the
                # last frames taken for a moment after the buffer shows empty).
                time.sleep(0.2)
                pod = pod_status(running)
                drained = running.metric("kv_cache_ingest_buffer_frames") == 0
                still = drained and bool(seen) and seen[-1] == pod
                seen.append(pod)
                return pod if still else None

            pod = wait_for(settled, timeout=30, what="the burst applied or counted")
        finally:
            engine.close()
        dropped = running.metric("kv_cache_frames_dropped_total", pod=POD, reason="buffer_full")
        # Every frame is applied, counted as lost, or (at the tail) dropped and flagged.
        assert pod["batches"] + pod["lost_batches"] + dropped >= FRAMES
        assert dropped == running.metric("kv_cache_event_decode_errors_total", reason="buffer_full")
        assert pod["dropped"] >= 1
        assert pod["batches"] < FRAMES  # something was dropped...
        if pod["last_seq"] == FRAMES - 1:
            assert pod["lost_batches"] >= 1 and pod["gaps"] >= 1  # ...and shown as a gap
        else:
            assert pod["state"] == "stale"  # ...or, the tail dropped, as a stale pod
            warnings = running.http.get("/readyz").json()["warnings"]
            assert any(POD in warning and "buffer" in warning for warning in warnings)
        assert running.metric("kv_cache_ingest_buffer_limit_bytes") == 32 * 1024


@pytest.mark.parametrize("plane", PLANES)
def test_a_pod_with_a_replay_endpoint_gets_back_everything_dropped(plane: str) -> None:
    pub, replay = free_port(), free_port()
    pods = [
        {
            "pod_id": POD,
            "endpoint": f"tcp://127.0.0.1:{pub}",
            "replay_endpoint": f"tcp://127.0.0.1:{replay}",
            "model": MODEL,
        }
    ]
    engine = Engine(
        f"kv@{POD}@{MODEL}",
        bind=f"tcp://127.0.0.1:{pub}",
        replay_bind=f"tcp://127.0.0.1:{replay}",
    )
    try:
        config = {
            "data_plane": plane,
            "zmq": {"endpoint": "", "pods": pods, "buffer_bytes": BUFFER},
        }
        with daemon(config) as running:
            engine.wait_subscribed()
            # First contact replays from 0; let that settle before the burst.
            engine.publish(
                [stored([1 << 60], list(range(200_000, 200_000 + BLOCK)), block_size=BLOCK)]
            )
            wait_for(lambda: pod_status(running)["state"] == "live", what="first contact")
            burst(engine)

            def whole() -> dict[str, Any] | None:
                pod = pod_status(running)
                full = pod["blocks"] == FRAMES * BLOCKS_PER_EVENT + 1 and pod["state"] == "live"
                return pod if full else None

            pod = wait_for(whole, timeout=60, what="every block back, through replays")
            assert (
                running.metric("kv_cache_frames_dropped_total", pod=POD, reason="buffer_full") >= 1
            )
            assert pod["replays"] >= 1 and pod["lost_batches"] == 0
    finally:
        engine.close()
