"""List and watch pods through the Kubernetes API, with kubernetes_asyncio's client.

The client brings the credentials (in-cluster service account with token refresh, or a
kubeconfig), TLS and the HTTP session; responses are read raw (``_preload_content=False``)
so a watch is consumed line by line as the API server streams it, and only the fields
discovery needs are parsed (``pods.parse_pod``). Every failure is a ``KubeApiError``:
``ApiUnreachable`` when the connection failed or broke (retry the same call),
``ResourceExpired`` (410 Gone) when the resource version is too old (list again).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

from service.config import DiscoverySettings
from service.discovery.pods import PodInfo, parse_pod

__all__ = [
    "ApiUnreachable",
    "KubeApiError",
    "PodList",
    "PodsApi",
    "ResourceExpired",
    "WatchEvent",
    "open_pods_api",
]

_NAMESPACE_FILE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_LIST_TIMEOUT: Final = aiohttp.ClientTimeout(total=60, sock_connect=10)
# The server ends a watch after timeoutSeconds; a connection silent much longer is dead.
_WATCH_READ_MARGIN: Final = 30.0


class KubeApiError(Exception):
    """The API server could not be reached, refused, or answered something unusable."""


class ApiUnreachable(KubeApiError):
    """No answer: the connection failed, timed out or broke mid-stream."""


class ResourceExpired(KubeApiError):
    """410 Gone: the watch's resource version is older than the server keeps; list again."""


@dataclass(frozen=True, slots=True)
class PodList:
    """A consistent list of pods and the resource version to watch from."""

    resource_version: str
    pods: list[PodInfo]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event; ``pod`` is None for a ``BOOKMARK`` (it only moves the version)."""

    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    resource_version: str | None
    pod: PodInfo | None


class PodsApi:
    """Pods of one namespace that match one label selector: list, watch, close."""

    def __init__(self, client: ApiClient, namespace: str, label_selector: str) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self._client = client
        self._core = CoreV1Api(client)

    async def list(self) -> PodList:
        """Every matching pod now, and the resource version of that list."""
        async with await self._request(_request_timeout=_LIST_TIMEOUT) as response:
            try:
                body = await response.json(content_type=None)
                version = body["metadata"]["resourceVersion"]
                pods = [parse_pod(item) for item in body.get("items") or ()]
            except (aiohttp.ClientError, TimeoutError) as error:
                raise ApiUnreachable(f"listing pods: {_describe(error)}") from error
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise KubeApiError(f"listing pods: unexpected answer: {error!r}") from error
        return PodList(str(version), pods)

    async def watch(
        self, resource_version: str, timeout_seconds: int
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes after ``resource_version``, until the server ends the watch (normally after
        ``timeout_seconds``). Close the iterator when done (``contextlib.aclosing``)."""
        response = await self._request(
            watch=True,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=10, sock_read=timeout_seconds + _WATCH_READ_MARGIN
            ),
        )
        async with response:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, TimeoutError) as error:
                    raise ApiUnreachable(f"watch stream broke: {_describe(error)}") from error
                except ValueError as error:  # a line longer than the read buffer
                    raise KubeApiError(f"unreadable watch event: {error}") from error
                if not line:
                    return
                if line.strip():
                    yield _decode_event(line)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._client.close()

    async def _request(self, **params: Any) -> aiohttp.ClientResponse:
        if self.label_selector:
            params["label_selector"] = self.label_selector
        try:
            # Not preloaded, the call returns aiohttp's response (the stubs say V1PodList).
            response = cast(
                aiohttp.ClientResponse,
                await self._core.list_namespaced_pod(
                    self.namespace, _preload_content=False, **params
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiUnreachable(f"cannot reach the API server: {_describe(error)}") from error
        if response.status != 200:
            async with response:
                detail = await _status_message(response)
            error_type = ResourceExpired if response.status == 410 else KubeApiError
            hint = " (check the RBAC Role: list and watch pods)" if response.status == 403 else ""
            raise error_type(f"HTTP {response.status}: {detail}{hint}")
        return response


def _decode_event(line: bytes) -> WatchEvent:
    try:
        data = json.loads(line)
        kind, obj = data["type"], data["object"]
        if kind == "ERROR":
            # A Status object; 410 Gone when the version is too old for the server.
            message = f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}"
            raise (ResourceExpired if obj.get("code") == 410 else KubeApiError)(message)
        if kind == "BOOKMARK":
            return WatchEvent("BOOKMARK", str(obj["metadata"]["resourceVersion"]), None)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise KubeApiError(f"unknown watch event type {kind!r}")
        pod = parse_pod(obj)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise KubeApiError(f"unreadable watch event: {error!r}") from error
    return WatchEvent(kind, pod.resource_version, pod)


async def _status_message(response: aiohttp.ClientResponse) -> str:
    try:
        text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as error:
        return _describe(error)
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text[:200] or (response.reason or "")


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def open_pods_api(settings: DiscoverySettings) -> PodsApi:
    """A ``PodsApi`` as configured: ``api_url`` (no credentials) if set, else in-cluster
    config when running in a pod, else the kubeconfig. Raises ``KubeApiError``."""
    configuration = Configuration()
    in_cluster = SERVICE_HOST_ENV_NAME in os.environ
    try:
        if settings.api_url is not None:
            configuration.host = settings.api_url.rstrip("/")
        elif in_cluster:
            # Reads the token and CA files; the token is re-read as it rotates.
            loader = InClusterConfigLoader(SERVICE_TOKEN_FILENAME, SERVICE_CERT_FILENAME)
            await asyncio.to_thread(loader.load_and_set, configuration)
        else:
            kubeconfig = _kubeconfig()
            await load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (ConfigException, OSError) as error:
        raise KubeApiError(f"no Kubernetes API configuration: {error}") from error
    namespace = settings.namespace
    if namespace is None:
        namespace = await asyncio.to_thread(_own_namespace)
    client = ApiClient(configuration)
    client.user_agent = "kv-cache-discovery"
    return PodsApi(client, namespace, settings.label_selector)


def _kubeconfig() -> str:
    path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if os.pathsep not in path and not Path(path).is_file():
        raise KubeApiError(
            f"not running in a pod and no kubeconfig at {path}; set KUBECONFIG, or"
            " discovery.api_url (e.g. kubectl proxy's http://127.0.0.1:8001)"
        )
    return path


def _own_namespace() -> str:
    try:
        return _NAMESPACE_FILE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"
