"""What the client's calls return: frozen dataclasses mirroring the REST JSON.

``Locality`` and ``PodLocality`` are ``POST /v1/locality``'s answer field for field
(``json.dumps(dataclasses.asdict(answer))`` is that JSON); ``Candidate`` is one entry of
``GetCandidates``. ``pods()`` and ``models()`` answer with the service's own ``PodStatus``
and ``ModelStatus``, re-exported here, so the client cannot drift from ``/v1/pods`` and
``/v1/models``.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.status import ModelStatus, PodStatus

__all__ = ["Candidate", "Locality", "ModelStatus", "PodLocality", "PodStatus"]


@dataclass(frozen=True, slots=True)
class PodLocality:
    """What one (pod, data-parallel rank) holds of the prompt."""

    pod_id: str
    dp_rank: int
    """0 for a pod without data parallelism."""
    match_length: int
    """Consecutive blocks from the first that the pod holds, on any tier."""
    matched_tokens: int
    """``match_length * block_size``."""
    block_count: int
    """Blocks of the prompt the pod holds anywhere, consecutive or not."""
    tiers: dict[str, int]
    """Blocks of the matched prefix per tier ("gpu", "cpu", "disk"); zero counts left out."""
    score: float
    """Tier-weighted ``match_length / total_blocks``, in [0, 1]."""


@dataclass(frozen=True, slots=True)
class Locality:
    """Which pods hold the longest cached prefix of one prompt (``POST /v1/locality``)."""

    model: str
    block_size: int | None
    """Tokens per block; None while the model has never been seen."""
    total_blocks: int
    """Full blocks in the prompt; 0 when nothing could be scored."""
    cache_hits: int
    """The best pod's ``match_length``."""
    coverage: float
    """``cache_hits / total_blocks``."""
    pods: tuple[PodLocality, ...]
    """Best first: score desc, then pod_id, then dp_rank."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked pod of ``candidates()``."""

    pod: str
    """Pod label: ``pod_id`` for rank 0, ``pod_id@dp<r>`` for rank r > 0 (as ``score()``'s
    keys)."""
    score: float
    match_length: int
