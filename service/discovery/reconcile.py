"""Keeps the subscriptions equal to the Ready engine pods the API reports.

- A pod that becomes a target (Ready, with an IP) is subscribed to (connect mode).
- A subscribed pod that stops being one is dropped after ``grace``, unless it recovers: a
  restarting engine keeps its subscription (ZeroMQ reconnects by itself), and its entries.
- A deleted pod, or one missing from a fresh list, is dropped at once.
- Dropping unsubscribes and removes the pod's entries from the index.
- A pod whose endpoint changes (model, DP size, ...) is dropped and subscribed again.
Two Kubernetes pods may map to one pod id (an IP reused before the old pod's deletion was
seen): the newer one takes the id over, and the older one's drop leaves it alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from service.discovery.pods import PodInfo, PodTargets
from service.events.subscriber import PodEndpoint

__all__ = ["PodForgetter", "PodSubscriber", "Reconciler"]

log = structlog.get_logger("kv_cache.discovery")


class PodSubscriber(Protocol):
    """Connect-mode subscriptions by pod id (``events.subscriber.Subscriber``)."""

    def connect(self, pod: PodEndpoint) -> None: ...

    def disconnect(self, pod_id: str) -> None: ...


class PodForgetter(Protocol):
    """Drops what is known of a pod (``ingest.Ingestor``)."""

    async def forget_pod(self, pod_id: str) -> None: ...


@dataclass(slots=True)
class _Pod:
    ref: str
    endpoint: PodEndpoint | None = None
    """Subscribed to, while not None."""
    expiry: asyncio.Task[None] | None = None
    """Drops the pod when the grace period ends (it is not Ready)."""


class Reconciler:
    """Applies pod observations to a ``PodSubscriber`` and a ``PodForgetter``.

    Pod ids in ``reserved`` (``zmq.pods``, configured by hand) are never touched.
    """

    def __init__(
        self,
        subscriber: PodSubscriber,
        forgetter: PodForgetter,
        targets: PodTargets,
        *,
        grace: float,
        reserved: Iterable[str] = (),
    ) -> None:
        self._subscriber = subscriber
        self._forgetter = forgetter
        self._targets = targets
        self._grace = grace
        self._reserved = frozenset(reserved)
        self._pods: dict[str, _Pod] = {}  # by uid
        self._owners: dict[str, str] = {}  # pod id -> uid of the pod subscribed under it
        self._lock = asyncio.Lock()  # one change at a time: watch events and expiries

    @property
    def subscribed(self) -> dict[str, PodEndpoint]:
        """Pod id -> endpoint of every pod subscribed to now."""
        return {
            pod_id: endpoint
            for pod_id, uid in self._owners.items()
            if (endpoint := self._pods[uid].endpoint) is not None
        }

    async def observe(self, pod: PodInfo) -> None:
        """A pod was added or changed."""
        async with self._lock:
            await self._observe(pod)

    async def remove(self, pod: PodInfo) -> None:
        """A pod was deleted: drop it now."""
        async with self._lock:
            await self._remove(pod.uid, "deleted")

    async def resync(self, pods: Iterable[PodInfo]) -> None:
        """A fresh list: drop pods missing from it, then observe each listed one."""
        listed = {pod.uid: pod for pod in pods}
        async with self._lock:
            for uid in [uid for uid in self._pods if uid not in listed]:
                await self._remove(uid, "gone from the pod list")
            for pod in listed.values():
                await self._observe(pod)

    async def close(self) -> None:
        """Stop the grace timers; subscriptions and entries stay as they are."""
        timers = [pod.expiry for pod in self._pods.values() if pod.expiry is not None]
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)

    async def _observe(self, pod: PodInfo) -> None:
        state = self._pods.setdefault(pod.uid, _Pod(pod.ref))
        target = self._target(pod)
        if target is None:
            if state.endpoint is None:
                del self._pods[pod.uid]
            elif state.expiry is None:
                log.info(
                    "pod not ready",
                    pod=pod.ref,
                    pod_id=state.endpoint.pod_id,
                    drop_in_seconds=self._grace,
                )
                state.expiry = asyncio.create_task(
                    self._expire(pod.uid), name=f"discovery-expiry {pod.ref}"
                )
            return
        self._cancel_expiry(state)
        if state.endpoint == target:
            return
        if state.endpoint is not None:
            await self._unsubscribe(pod.uid, state, "endpoint changed")
        await self._subscribe(pod.uid, state, target)

    def _target(self, pod: PodInfo) -> PodEndpoint | None:
        try:
            target = self._targets.endpoint_for(pod)
        except ValueError as error:
            log.warning("pod not subscribed", pod=pod.ref, reason=str(error))
            return None
        if target is not None and target.pod_id in self._reserved:
            log.warning(
                "pod not subscribed",
                pod=pod.ref,
                pod_id=target.pod_id,
                reason="pod id already configured in zmq.pods",
            )
            return None
        return target

    async def _subscribe(self, uid: str, state: _Pod, target: PodEndpoint) -> None:
        owner = self._owners.get(target.pod_id)
        if owner is not None and owner != uid:
            previous = self._pods[owner]
            log.warning(
                "pod id taken over by another pod",
                pod_id=target.pod_id,
                previous=previous.ref,
                pod=state.ref,
            )
            await self._unsubscribe(owner, previous, "pod id taken over")
            del self._pods[owner]
        self._subscriber.connect(target)
        state.endpoint = target
        self._owners[target.pod_id] = uid
        # The subscriber logs the endpoints it connects to; this line ties them to the pod.
        log.info("pod subscribed", pod=state.ref, pod_id=target.pod_id, model=target.model)

    async def _remove(self, uid: str, reason: str) -> None:
        state = self._pods.pop(uid, None)
        if state is not None:
            await self._unsubscribe(uid, state, reason)

    async def _unsubscribe(self, uid: str, state: _Pod, reason: str) -> None:
        self._cancel_expiry(state)
        endpoint, state.endpoint = state.endpoint, None
        if endpoint is None or self._owners.get(endpoint.pod_id) != uid:
            return
        del self._owners[endpoint.pod_id]
        self._subscriber.disconnect(endpoint.pod_id)
        await self._forgetter.forget_pod(endpoint.pod_id)
        log.info("pod dropped", pod=state.ref, pod_id=endpoint.pod_id, reason=reason)

    def _cancel_expiry(self, state: _Pod) -> None:
        timer, state.expiry = state.expiry, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()

    async def _expire(self, uid: str) -> None:
        await asyncio.sleep(self._grace)
        async with self._lock:
            state = self._pods.get(uid)
            if state is None or state.expiry is not asyncio.current_task():
                return  # recovered or removed meanwhile
            await self._remove(uid, f"not ready for {self._grace:g}s")
