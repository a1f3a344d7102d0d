"""score_pods, locality, score_matches: the numbers a scheduler plugin reads."""

from __future__ import annotations

import pytest

from service.index.protocol import PodMatch, PodRank
from service.scoring import PodScore, TierWeights, locality, score_matches, score_pods

A, B, C = PodRank("10.0.0.1:8000"), PodRank("10.0.0.2:8000"), PodRank("10.0.0.3:8000")
GPU, CPU, DISK = 0b001, 0b010, 0b100


def test_contract_example() -> None:
    # 20 matched blocks of 32: 16 on GPU, 4 on CPU only -> (16 + 4 * 0.8) / 32 = 0.6.
    locality = score_matches([PodMatch(A, 20, 20, {GPU: 16, CPU: 4})], 32, TierWeights())
    (pod,) = locality.pods
    assert (locality.total_blocks, locality.cache_hits, locality.coverage) == (32, 20, 0.625)
    assert pod.tiers == {"gpu": 16, "cpu": 4}
    assert pod.score == pytest.approx(0.6)


def test_block_on_two_tiers_counts_in_both_and_weighs_its_best() -> None:
    locality = score_matches([PodMatch(A, 4, 4, {GPU | CPU: 2, CPU | DISK: 2})], 4, TierWeights())
    assert locality.pods[0].tiers == {"gpu": 2, "cpu": 4, "disk": 2}
    assert locality.pods[0].score == pytest.approx((2 * 1.0 + 2 * 0.8) / 4)


def test_sorted_by_score_then_pod_then_rank() -> None:
    a1 = PodRank(A.pod_id, 1)
    matches = [
        PodMatch(C, 2, 2, {GPU: 2}),
        PodMatch(a1, 2, 2, {GPU: 2}),
        PodMatch(A, 2, 3, {GPU: 2}),
        PodMatch(B, 3, 3, {DISK: 3}),
    ]
    locality = score_matches(matches, 4, TierWeights())
    assert [p.pod for p in locality.pods] == [A, a1, C, B]
    assert locality.cache_hits == 2


def test_custom_weights_change_the_order() -> None:
    matches = [PodMatch(A, 2, 2, {GPU: 2}), PodMatch(B, 4, 4, {DISK: 4})]
    assert score_matches(matches, 4, TierWeights()).pods[0].pod == A
    assert score_matches(matches, 4, TierWeights(disk=1.0)).pods[0].pod == B


def test_candidates_restrict_and_zero_fill() -> None:
    locality = score_matches(
        [PodMatch(A, 2, 2, {GPU: 2}), PodMatch(B, 1, 1, {GPU: 1})], 4, TierWeights(), [B, C]
    )
    assert [(p.pod, p.score, p.match_length) for p in locality.pods] == [
        (B, 0.25, 1),
        (C, 0.0, 0),
    ]


def test_nothing_cached() -> None:
    locality = score_matches([], 8, TierWeights())
    assert (locality.cache_hits, locality.coverage, locality.pods) == (0, 0.0, [])
    assert score_matches([], 0, TierWeights()).coverage == 0.0


def test_weights_must_be_fractions() -> None:
    with pytest.raises(ValueError, match="cpu"):
        TierWeights(cpu=1.5)


def test_score_pods_leaves_out_pods_holding_none_of_the_prompt() -> None:
    matches = [PodMatch(B, 0, 0, {}), PodMatch(C, 0, 2, {}), PodMatch(A, 1, 1, {GPU: 1})]
    scored = score_pods(matches, 4, TierWeights())
    # C holds blocks past the first only: listed, with score 0, after the pods that match.
    assert [(p.pod, p.match_length, p.block_count, p.score) for p in scored] == [
        (A, 1, 1, 0.25),
        (C, 0, 2, 0.0),
    ]


def test_locality_keeps_the_planes_order_and_names_the_best_pod() -> None:
    pods = [PodScore(B, 3, 3, {"gpu": 3}, 0.75), PodScore(A, 1, 2, {"gpu": 1}, 0.25)]
    answer = locality(pods, 4)
    assert answer.pods == pods
    assert (answer.total_blocks, answer.cache_hits, answer.coverage) == (4, 3, 0.75)
    only_a = locality(pods, 4, [A])
    assert (only_a.pods, only_a.cache_hits) == ([pods[1]], 1)
