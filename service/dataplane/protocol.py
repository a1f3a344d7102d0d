"""What the rest of the service needs from a data plane, whichever implementation runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from service.dataplane.registry import StreamSnapshot
from service.events.subscriber import Frame, PodEndpoint
from service.scoring import PodScore
from service.status import ModelStatus, PodStatus

__all__ = ["DataPlane", "DataPlaneKind", "Lookup", "PlaneCounts"]

DataPlaneKind = Literal["native", "python"]


@dataclass(frozen=True, slots=True)
class Lookup:
    """The pods holding a prompt's blocks, scored and sorted (score, pod id, rank)."""

    block_size: int | None
    """None while the model's block size is not known (no event seen)."""
    total_blocks: int
    pods: list[PodScore]


@dataclass(frozen=True, slots=True)
class PlaneCounts:
    """What the data plane has counted since start, for ``/metrics``."""

    events: dict[str, int]
    """Events decoded, by type (BlockStored, BlockRemoved, AllBlocksCleared)."""
    drops: dict[str, int]
    """Events or batches skipped, by reason: nothing is dropped without a count."""
    batches: dict[str, int]
    """Batches received, by source (live, replay)."""
    lag_buckets: tuple[float, ...]
    lag_counts: tuple[int, ...]
    """Visible lag histogram: per bucket of ``lag_buckets``, then +Inf (not cumulative)."""
    lag_sum: float
    buffer_bytes: int
    buffer_frames: int
    buffer_max_bytes: int
    entries: int
    evictions: dict[str, int]
    dropped_by_pod: dict[str, int]
    """Frames dropped because the ingest buffer was full, by the pod that sent them."""
    hash_mismatches: dict[str, int]
    """vllm key mode: engine hashes that differed from ours, by model."""


class DataPlane(Protocol):
    """Receives vLLM's KV events, keeps the block index, answers lookups.

    Every implementation must: follow CONTRACT.md section 6 per (pod, rank) stream
    (sequence numbers, replay, restarts), count every dropped frame or event with a reason,
    never let one bad frame stop ingestion, and answer lookups while ingesting.
    """

    @property
    def kind(self) -> DataPlaneKind:
        """``native`` or ``python``."""
        ...

    @property
    def failure(self) -> str | None:
        """Why ingestion stopped, when a part of it died; None while it runs."""
        ...

    def bind(self, endpoint: str, data_parallel_size: int) -> list[str]:
        """Bind mode: binds ``endpoint`` and the next ranks' ports; returns what was bound.

        Raises ``OSError`` naming the endpoint when it cannot be bound.
        """
        ...

    def connect(self, pod: PodEndpoint) -> None:
        """Connect mode: subscribes to an engine's PUB socket(s); replaces an earlier entry."""
        ...

    def disconnect(self, pod_id: str) -> None:
        """Stops receiving from a connect-mode pod (what it stored stays until forgotten)."""
        ...

    async def forget_pod(self, pod_id: str) -> None:
        """Drops a pod: its streams and entries. Frames it sent before now are dropped."""
        ...

    async def start(self) -> None:
        """Starts ingesting (sockets already bound or connected keep their frames)."""
        ...

    async def stop(self) -> None:
        """Stops receiving, applies what is queued (briefly), ends every task and thread."""
        ...

    async def ingest_frame(self, frame: Frame) -> None:
        """Applies one frame as if just received, before ``start`` (tests, benchmarks)."""
        ...

    async def lookup(
        self,
        model: str,
        *,
        token_ids: Sequence[int] | None = None,
        block_hashes: Sequence[int] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Lookup:
        """Scores every pod holding blocks of a prompt, given as token ids (already
        validated: ints in [0, 2**32)) or as a chain of engine block hashes."""
        ...

    def block_size(self, model: str) -> int | None:
        """The model's block size as learnt from its events; None while unknown."""
        ...

    async def pods(self) -> list[PodStatus]:
        """Every (pod, rank) stream seen, for ``/v1/pods``."""
        ...

    def streams(self) -> list[StreamSnapshot]:
        """Every (pod, rank) stream seen, for metrics (block counts may lag a little)."""
        ...

    async def models(self) -> list[ModelStatus]:
        """Every model configured or seen in events, for ``/v1/models``."""
        ...

    def warnings(self) -> list[str]:
        """Problems worth an operator's eye that do not stop answers (``/readyz``)."""
        ...

    def counts(self) -> PlaneCounts:
        """Counters and sizes, read at scrape time."""
        ...
