"""A typed Python client of kv-cache's gRPC API (``kvcache.v1.KVCacheService``), for
schedulers: ``KVCacheClient`` (blocking) and ``AsyncKVCacheClient`` (asyncio), with the
same methods, results and errors. docs/client.md has examples.

    with KVCacheClient("kv-cache:9090") as client:
        try:
            scores = client.score("m", token_ids, pods=candidates)
        except ServiceUnavailable:
            scores = {}  # fall back to default scoring
"""

from service.client._wire import DEFAULT_TIMEOUT
from service.client.aio import AsyncKVCacheClient
from service.client.errors import (
    InvalidRequest,
    KVCacheError,
    RequestTooLarge,
    ServiceUnavailable,
    Unsupported,
)
from service.client.results import Candidate, Locality, ModelStatus, PodLocality, PodStatus
from service.client.sync import KVCacheClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncKVCacheClient",
    "Candidate",
    "InvalidRequest",
    "KVCacheClient",
    "KVCacheError",
    "Locality",
    "ModelStatus",
    "PodLocality",
    "PodStatus",
    "RequestTooLarge",
    "ServiceUnavailable",
    "Unsupported",
]
