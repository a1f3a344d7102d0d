"""kv-cache's native data plane (native/*.cpp): ingest, index and lookups with the GIL released."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

from typing_extensions import Buffer

def token_keys(
    tokens: Buffer,
    block_size: int,
    parent: int | None = None,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """Keys of the full blocks of uint32 token ids, as TokenKeys.block_keys computes them."""

def parse_plain_locality(
    body: Buffer,
) -> tuple[str, bytes, str | None, str | None, list[str] | None] | None:
    """(model, token ids as packed uint32, lora_name, cache_salt, pods) of a plain locality
    body, or None for any other body (native/rest_body.hpp)."""

class UnknownParent(LookupError):
    """The digest of a parent block hash is not remembered (keys.UnknownParent)."""

    parent: int

class VllmHasher:
    """vLLM's block hash (key mode vllm), as service.index.keys.VllmKeys."""

    def __init__(
        self,
        algorithm: Literal["sha256", "sha256_cbor"] = "sha256",
        seed: str | None = None,
        max_parents: int = 1_000_000,
    ) -> None: ...
    @property
    def algorithm(self) -> Literal["sha256", "sha256_cbor"]: ...
    @property
    def seed(self) -> str: ...
    @property
    def root(self) -> bytes:
        """H(seed), the chain's first parent."""
    @property
    def remembered(self) -> int:
        """How many digests are remembered for continuing chains."""
    @property
    def max_parents(self) -> int: ...
    def block_keys(
        self,
        tokens: Buffer,
        block_size: int,
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        remember: bool = False,
    ) -> list[int]:
        """VllmKeys.block_keys; raises UnknownParent when the parent's digest is unknown."""
    def check_published(
        self,
        tokens: Buffer,
        block_size: int,
        published: Sequence[int],
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Literal["match", "mismatch", "unknown_parent"]:
        """VllmKeys.check_published, the HashCheck's value."""

def vllm_encode_root(algorithm: Literal["sha256", "sha256_cbor"], seed: str) -> bytes:
    """The bytes hashed for the chain root (pickle protocol 5 or canonical CBOR). For tests."""

def vllm_encode_block(
    algorithm: Literal["sha256", "sha256_cbor"],
    parent: bytes,
    tokens: Buffer,
    extra: Sequence[str] | None,
) -> bytes:
    """The bytes hashed for one block, (parent, tuple(tokens), extra). For tests."""

class BlockIndex:
    """The native index alone, models and pods by name (service/index/native.py)."""

    def __init__(self, ttl: float, max_entries: int) -> None: ...
    def store(
        self, model: str, pod: str, rank: int, keys: Sequence[int], tier: int, now: float
    ) -> None: ...
    def remove(
        self, model: str, pod: str, rank: int, keys: Sequence[int], tier: int, now: float
    ) -> None: ...
    def clear(self, model: str, pod: str, rank: int) -> None: ...
    def drop_pod(self, pod: str) -> None: ...
    def enforce_capacity(self) -> None: ...
    def sweep(self, now: float, budget: int | None = None) -> int: ...
    def lookup(
        self,
        model: str,
        keys: Sequence[int],
        now: float,
        pods: Sequence[tuple[str, int]] | None = None,
    ) -> list[tuple[str, int, int, int, dict[int, int]]]:
        """[(pod_id, rank, match_length, block_count, {tier set: blocks})], by pod."""
    def stats(self) -> dict[str, Any]: ...

_PodAnswer = tuple[str, int, int, int, int, int, int, float]
"""(pod_id, rank, match_length, block_count, gpu, cpu, disk, score)"""
_Answer = tuple[bool, int | None, int, list[_PodAnswer]]
"""(known model, block size, keys, pods by score, pod id, rank)"""
_Notice = tuple[str, int, str, int, str, bytes, int, int]
"""(kind, stream, pod_id, rank, model, text, seq, other)"""

class DataPlane:
    """The native data plane (service/dataplane/native.py drives it)."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        max_engine_hashes: int,
        max_parents: int,
        buffer_bytes: int,
        topic_filter: str,
        max_frame_bytes: int,
        receive_hwm: int,
        replay: bool,
        replay_endpoints: Mapping[str, str],
        lag_buckets: Sequence[float],
        weights: Sequence[float],
    ) -> None: ...
    def configure_model(
        self, name: str, key_mode: str, hash_algorithm: str, hash_seed: str | None
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self, drain_seconds: float) -> None: ...
    def bind(self, endpoint: str, data_parallel_size: int) -> list[str]: ...
    def connect(
        self,
        pod_id: str,
        endpoint: str,
        replay_endpoint: str,
        model: str,
        data_parallel_size: int,
    ) -> None: ...
    def disconnect(self, pod_id: str) -> None: ...
    def forget_pod(self, pod_id: str, at: float) -> None: ...
    def replay_done(self, stream: int, batches: list[tuple[int, bytes]], ok: bool) -> None: ...
    def notice_fd(self) -> int: ...
    def take_notices(self) -> list[_Notice]: ...
    def locality_tokens(
        self, model: str, tokens: Buffer, lora_name: str | None, cache_salt: str | None
    ) -> _Answer: ...
    def locality_hashes(self, model: str, hashes: Buffer) -> _Answer: ...
    def block_size(self, model: str) -> int | None: ...
    def streams(self) -> list[dict[str, Any]]: ...
    def models(self) -> list[dict[str, Any]]: ...
    def counts(self) -> dict[str, Any]: ...
    def set_clock_for_test(self, seconds: float) -> None: ...
    def serve_grpc(
        self,
        address: str,
        backend: str,
        max_message_bytes: int,
        max_tokens: int,
        buckets: Sequence[float],
    ) -> int: ...
    def stop_grpc(self, grace_seconds: float) -> None: ...
    def grpc_counts(self) -> dict[str, Any]: ...
    def serve_http(
        self,
        host: str,
        port: int,
        backend: str,
        max_body_bytes: int,
        max_tokens: int,
        buckets: Sequence[float],
    ) -> int: ...
    def stop_http(self, grace_seconds: float) -> None: ...
    def http_counts(self) -> dict[str, Any]: ...
    def apply_frame_for_test(
        self,
        topic: bytes,
        seq: int,
        payload: bytes,
        pod_id: str = "",
        model: str = "",
        rank: int = 0,
        replay_endpoint: str = "",
        received: float = 0.0,
    ) -> None: ...

# native/bind_decode.cpp: an extra_keys entry is None or (length, first element if a str,
# second element if a str, the entry's msgpack bytes).
ExtraKey: TypeAlias = tuple[int, str | None, str | None, bytes] | None
StoredEvent: TypeAlias = tuple[
    Literal["BlockStored"],
    tuple[int, ...],  # block_hashes
    int | None,  # parent_block_hash
    tuple[int, ...],  # token_ids
    int,  # block_size
    int,  # tier (service.events.model.Tier)
    str | None,  # lora_name
    int | None,  # lora_id
    tuple[ExtraKey, ...] | None,  # extra_keys
]
RemovedEvent: TypeAlias = tuple[Literal["BlockRemoved"], tuple[int, ...], int]
ClearedEvent: TypeAlias = tuple[Literal["AllBlocksCleared"]]
DecodedEvent: TypeAlias = StoredEvent | RemovedEvent | ClearedEvent

def decode_batch(
    payload: bytes,
) -> tuple[float, int | None, list[DecodedEvent], dict[str, int]]: ...
