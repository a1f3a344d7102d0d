"""What a watched pod means to the service: is it an engine to subscribe to now, and where.

A pod is subscribed to when it is Running, its ``Ready`` condition is true, it has an IP and
it is not being deleted. Its id is ``discovery.pod_id_template`` filled in, so it matches the
name the scheduler gives the same pod (``IP:port`` by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.config import DiscoverySettings
from service.events.subscriber import PodEndpoint

__all__ = ["PodInfo", "PodTargets", "parse_pod"]


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The parts of a Kubernetes Pod object discovery reads."""

    uid: str
    namespace: str
    name: str
    resource_version: str | None = None
    ip: str | None = None
    ready: bool = False
    """Running, ``Ready`` condition true and not terminating."""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``namespace/name``, for logs."""
        return f"{self.namespace}/{self.name}"


def parse_pod(obj: object) -> PodInfo:
    """A ``PodInfo`` from a Pod as the API serves it (JSON); ``ValueError`` if it is not one."""
    if not isinstance(obj, dict) or not isinstance(meta := obj.get("metadata"), dict):
        raise ValueError("not a Pod object: no metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("not a Pod object: no metadata.name")
    namespace = _text(meta.get("namespace")) or "default"
    status = obj.get("status")
    status = status if isinstance(status, dict) else {}
    ready = (
        status.get("phase") == "Running"
        and meta.get("deletionTimestamp") is None
        and any(
            isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
    )
    return PodInfo(
        # The uid tells a re-created pod (same name, e.g. a StatefulSet's) from the old one.
        uid=_text(meta.get("uid")) or f"{namespace}/{name}",
        namespace=namespace,
        name=name,
        resource_version=_text(meta.get("resourceVersion")),
        ip=_text(status.get("podIP")),
        ready=ready,
        labels=_strings(meta.get("labels")),
        annotations=_strings(meta.get("annotations")),
    )


class PodTargets:
    """Maps a pod to the engine endpoint to subscribe to, by the discovery settings."""

    def __init__(self, settings: DiscoverySettings) -> None:
        self._settings = settings

    def endpoint_for(self, pod: PodInfo) -> PodEndpoint | None:
        """The pod's endpoint, or ``None`` while it is not a Ready pod with an IP.

        Raises ``ValueError`` naming the annotation when the pod's DP size is not a number >= 1.
        """
        if not pod.ready or not pod.ip:
            return None
        settings = self._settings
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip  # IPv6 in a URL
        replay = settings.replay_port
        return PodEndpoint(
            pod_id=settings.pod_id_template.format(
                ip=pod.ip, name=pod.name, namespace=pod.namespace, port=settings.http_port
            ),
            endpoint=f"tcp://{host}:{settings.event_port}",
            replay_endpoint=None if replay is None else f"tcp://{host}:{replay}",
            model=_lookup(pod, settings.model_annotation),
            data_parallel_size=self._dp_size(pod),
        )

    def _dp_size(self, pod: PodInfo) -> int:
        key = self._settings.dp_size_annotation
        text = _lookup(pod, key)
        if text is None:
            return 1
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"annotation {key}={text!r} is not a data-parallel size >= 1")
        return int(text)


def _lookup(pod: PodInfo, key: str) -> str | None:
    # Annotations first: a label value cannot hold a "/" (most model names have one).
    return pod.annotations.get(key) or pod.labels.get(key) or None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}
