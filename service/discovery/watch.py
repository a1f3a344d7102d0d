"""The pod watch loop: list, then watch from the list's version; recover from every failure.

- A list (the first one, and every later one) reconciles the whole set of pods, so pods
  deleted while the watch was down are dropped.
- A watch the server ends (after ``timeoutSeconds``) resumes from the last version seen.
- No answer (server unreachable, stream broken): retry after a backoff, exponential with a
  cap and jitter, resuming from the last version seen.
- 410 Gone (version too old): list again at once. Any other error answer: list again after
  the backoff.
Subscriptions stay as they are while the API server is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from typing import Final

import structlog

from service.config import DiscoverySettings
from service.discovery.kube import (
    ApiUnreachable,
    KubeApiError,
    PodsApi,
    ResourceExpired,
    open_pods_api,
)
from service.discovery.pods import PodTargets
from service.discovery.reconcile import PodForgetter, PodSubscriber, Reconciler

__all__ = ["Backoff", "PodWatcher"]

log = structlog.get_logger("kv_cache.discovery")

# Like client-go's reflector: watches of 5 to 10 minutes, so many clients do not all
# reconnect at once.
_WATCH_SECONDS: Final = (300, 600)
_SHORT_WATCH_SECONDS: Final = 1.0


class Backoff:
    """Retry delays: ``initial``, doubling up to ``cap``, each scaled by a random factor in
    [0.5, 1] so that replicas failing together do not retry together."""

    def __init__(
        self, initial: float, cap: float, random_unit: Callable[[], float] = random.random
    ) -> None:
        self._initial = min(initial, cap)
        self._cap = cap
        self._random_unit = random_unit
        self._delay = self._initial

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the one after."""
        delay = self._delay
        self._delay = min(self._cap, delay * 2)
        return delay * (0.5 + self._random_unit() / 2)

    def reset(self) -> None:
        """Back to ``initial``, after a success."""
        self._delay = self._initial


class PodWatcher:
    """Owns the discovery task: subscribes to the engine pods the Kubernetes API reports.

    ``start()`` runs it in the background; ``stop()`` cancels it and waits. Subscriptions
    and index entries are left as they are at stop (the shutdown closes the sockets).
    ``backoff_initial`` and ``watch_timeout`` (seconds) exist for tests.
    """

    def __init__(
        self,
        settings: DiscoverySettings,
        subscriber: PodSubscriber,
        forgetter: PodForgetter,
        *,
        reserved: Iterable[str] = (),
        backoff_initial: float = 0.5,
        watch_timeout: int | None = None,
    ) -> None:
        self._settings = settings
        self.reconciler = Reconciler(
            subscriber,
            forgetter,
            PodTargets(settings),
            grace=settings.not_ready_grace,
            reserved=reserved,
        )
        self._backoff = Backoff(backoff_initial, settings.resync_backoff_max)
        self._watch_timeout = watch_timeout
        self._version: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="discovery")

    async def stop(self) -> None:
        """Cancel the background task and wait for it to finish."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Watch until cancelled."""
        try:
            api = await self._open()
            try:
                log.info(
                    "pod discovery started",
                    namespace=api.namespace,
                    label_selector=api.label_selector,
                )
                await self._sync(api)
            finally:
                await api.close()
        finally:
            await self.reconciler.close()

    async def _open(self) -> PodsApi:
        while True:
            try:
                return await open_pods_api(self._settings)
            except KubeApiError as error:
                await self._retry_later("cannot set up the Kubernetes client", error)

    async def _sync(self, api: PodsApi) -> None:
        expired_before = False
        while True:
            try:
                if self._version is None:
                    await self._list(api)
                await self._watch(api)
                expired_before = False
            except ResourceExpired as error:
                log.info("pod watch expired; listing again", reason=str(error))
                self._version = None
                if expired_before:  # even a fresh list's version: do not hammer the server
                    await self._retry_later("pod watch expired again", error)
                expired_before = True
            except ApiUnreachable as error:
                await self._retry_later("Kubernetes API unreachable", error)
            except KubeApiError as error:
                self._version = None
                await self._retry_later("pod list or watch failed", error)
            except Exception as error:  # a bug must not end discovery for good
                log.exception("pod discovery failed")
                self._version = None
                await self._retry_later("pod discovery failed", error)

    async def _list(self, api: PodsApi) -> None:
        listing = await api.list()
        await self.reconciler.resync(listing.pods)
        self._version = listing.resource_version
        log.info(
            "pods listed",
            pods=len(listing.pods),
            subscribed=len(self.reconciler.subscribed),
            resource_version=listing.resource_version,
        )

    async def _watch(self, api: PodsApi) -> None:
        assert self._version is not None
        timeout = self._watch_timeout or random.randint(*_WATCH_SECONDS)
        began = time.monotonic()
        events = 0
        try:
            async with contextlib.aclosing(api.watch(self._version, timeout)) as stream:
                async for event in stream:
                    events += 1
                    if event.pod is not None and event.type == "DELETED":
                        await self.reconciler.remove(event.pod)
                    elif event.pod is not None:
                        await self.reconciler.observe(event.pod)
                    self._version = event.resource_version or self._version
        finally:
            # Only a watch that worked ends the backoff (a list alone does not: the
            # server may fail every watch after it).
            if events or time.monotonic() - began >= _SHORT_WATCH_SECONDS:
                self._backoff.reset()
        if events == 0 and time.monotonic() - began < _SHORT_WATCH_SECONDS:
            # Not the server's timeout: something between us closes watches at once.
            raise ApiUnreachable("the watch ended as soon as it started")

    async def _retry_later(self, what: str, error: Exception) -> None:
        delay = self._backoff.next()
        log.warning(what, error=str(error), retry_in_seconds=round(delay, 3))
        await asyncio.sleep(delay)
