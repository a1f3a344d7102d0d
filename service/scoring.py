"""Scores: longest cached prefix per pod, tier-weighted, normalised by the prompt's blocks.

See CONTRACT.md section 4: ``match_length`` counts consecutive blocks from the first that a
pod holds on any tier; ``score`` weighs each of those blocks by its best tier and divides by
``total_blocks``; pods sort by score, then pod_id, then dp_rank.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from service.events.model import Tier
from service.index.protocol import PodMatch, PodRank

__all__ = ["Locality", "PodScore", "TierWeights", "locality", "score_matches", "score_pods"]

_TIER_SETS: Final = range(1 << len(Tier))
_LABELS_OF_SET: Final = tuple(
    tuple(tier.label for tier in Tier if tier_set >> tier & 1) for tier_set in _TIER_SETS
)
"""The tier labels in each bitmask of ``1 << Tier`` (read per query, so made once)."""


@dataclass(frozen=True, slots=True)
class TierWeights:
    """How much a cached block is worth by tier; a block on several tiers takes its best."""

    gpu: float = 1.0
    cpu: float = 0.8
    disk: float = 0.5
    _best: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("gpu", "cpu", "disk"):
            weight = getattr(self, name)
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"tier weight {name} must be within [0, 1], got {weight}")
        best = tuple(
            max((self.of(t) for t in Tier if tier_set >> t & 1), default=0.0)
            for tier_set in _TIER_SETS
        )
        object.__setattr__(self, "_best", best)

    def of(self, tier: Tier) -> float:
        weight: float = getattr(self, tier.label)
        return weight

    def best(self, tier_set: int) -> float:
        """Weight of the best tier in a bitmask of ``1 << Tier``."""
        return self._best[tier_set]


@dataclass(frozen=True, slots=True)
class PodScore:
    """One (pod, rank) in an answer."""

    pod: PodRank
    match_length: int
    block_count: int
    tiers: Mapping[str, int]
    score: float


@dataclass(frozen=True, slots=True)
class Locality:
    """The answer to "which pods hold the longest prefix of this prompt"."""

    total_blocks: int
    cache_hits: int
    coverage: float
    pods: list[PodScore]


def score_pods(
    matches: Sequence[PodMatch], total_blocks: int, weights: TierWeights
) -> list[PodScore]:
    """Index matches as scored pods, sorted by score, then pod id, then rank."""
    scored = [_score(m, total_blocks, weights) for m in matches if m.block_count]
    scored.sort(key=_order)
    return scored


def locality(
    pods: Sequence[PodScore], total_blocks: int, candidates: Collection[PodRank] | None = None
) -> Locality:
    """The answer from scored, sorted pods.

    With ``candidates``, only those pods are answered, each of them even when it holds
    nothing (score 0).
    """
    answered = list(pods)
    if candidates is not None:
        wanted = set(candidates)
        answered = [p for p in answered if p.pod in wanted]
        seen = {p.pod for p in answered}
        answered += [PodScore(pod, 0, 0, {}, 0.0) for pod in wanted - seen]
        answered.sort(key=_order)
    cache_hits = answered[0].match_length if answered else 0
    coverage = cache_hits / total_blocks if total_blocks else 0.0
    return Locality(total_blocks, cache_hits, coverage, answered)


def score_matches(
    matches: Sequence[PodMatch],
    total_blocks: int,
    weights: TierWeights,
    candidates: Collection[PodRank] | None = None,
) -> Locality:
    """``locality`` of ``score_pods``: index matches to the whole answer."""
    return locality(score_pods(matches, total_blocks, weights), total_blocks, candidates)


def _order(score: PodScore) -> tuple[float, str, int]:
    return (-score.score, score.pod.pod_id, score.pod.dp_rank)


def _score(match: PodMatch, total_blocks: int, weights: TierWeights) -> PodScore:
    tiers: dict[str, int] = {}
    weighted = 0.0
    best = weights.best
    # In ascending tier-set order, as the native plane sums them: the same float in both.
    for tier_set, count in sorted(match.prefix_tiers.items()):
        weighted += best(tier_set) * count
        for label in _LABELS_OF_SET[tier_set]:
            tiers[label] = tiers.get(label, 0) + count
    score = min(1.0, weighted / total_blocks) if total_blocks else 0.0
    return PodScore(match.pod, match.match_length, match.block_count, tiers, score)
