from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from clients.protocol import RewardWeights
from server.rewards import (
    ADVANTAGE_EPS,
    CME_WEIGHTS,
    QMA_WEIGHTS,
    cme_reward,
    group_stats,
    normalize,
    qma_reward,
)


@pytest.mark.parametrize(("score", "expected"), [(1, 0.0), (2, 0.25), (3, 0.5), (4, 0.75), (5, 1.0), (3.5, 0.625)])
def test_normalize_maps_1_to_5_onto_0_to_1(score: float, expected: float) -> None:
    assert normalize(score) == expected


@pytest.mark.parametrize("score", [0, 0.99, 5.01, 6, -1])
def test_normalize_refuses_scores_outside_1_to_5(score: float) -> None:
    with pytest.raises(ValueError, match="score must be in"):
        normalize(score)


def test_paper_weights() -> None:
    assert (CME_WEIGHTS.w1, CME_WEIGHTS.w2) == (0.6, 0.4)
    assert (QMA_WEIGHTS.w1, QMA_WEIGHTS.w2) == (0.4, 0.6)


@pytest.mark.parametrize(
    ("execution", "consistency", "reward"),
    [
        (5, 5, 1.0),
        (5, 1, 0.6),  # executed, everything else changed: w1 only
        (1, 5, 0.0),  # unchanged image: execution gates the reward to nothing
        (3, 3, 0.5 * (0.6 + 0.4 * 0.5)),
        (4, 2, 0.75 * (0.6 + 0.4 * 0.25)),
    ],
)
def test_cme_reward(execution: int, consistency: int, reward: float) -> None:
    assert math.isclose(cme_reward(execution, consistency), reward, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("instruction", "quality", "reward"),
    [(5, 5, 1.0), (5, 1, 0.4), (1, 5, 0.0), (4, 3, 0.75 * (0.4 + 0.6 * 0.5))],
)
def test_qma_reward(instruction: int, quality: int, reward: float) -> None:
    assert math.isclose(qma_reward(instruction, quality), reward, abs_tol=1e-12)


def test_rewards_take_custom_weights() -> None:
    weights = RewardWeights(w1=0.5, w2=0.5)
    assert cme_reward(5, 3, weights) == 1.0 * (0.5 + 0.5 * 0.5)
    assert qma_reward(3, 5, weights) == 0.5 * (0.5 + 0.5 * 1.0)


def test_expected_scores_feed_the_reward_too() -> None:
    assert math.isclose(cme_reward(4.5, 3.0), 0.875 * (0.6 + 0.4 * 0.5))


def test_custom_weights_are_divided_by_their_sum_as_in_the_release() -> None:
    # the release's total-score weights 1/1 mean an even split
    assert math.isclose(cme_reward(5, 3, RewardWeights(w1=1.0, w2=1.0)), 0.75)
    assert math.isclose(qma_reward(4, 2, RewardWeights(w1=2.0, w2=6.0)), 0.75 * (0.25 + 0.75 * 0.25))
    # only the ratio matters, and the paper's weights already sum to 1
    assert cme_reward(4, 2, RewardWeights(w1=6.0, w2=4.0)) == pytest.approx(cme_reward(4, 2))
    assert 0.0 <= qma_reward(5, 5, RewardWeights(w1=3.0, w2=0.0)) <= 1.0


@pytest.mark.parametrize(("w1", "w2"), [(-0.1, 0.5), (0.0, 0.0), (float("nan"), 1.0), (float("inf"), 1.0)])
def test_weights_out_of_bounds_are_refused(w1: float, w2: float) -> None:
    with pytest.raises(ValidationError):
        RewardWeights(w1=w1, w2=w2)


def test_group_stats_exact() -> None:
    stats = group_stats([0.9, 0.5, 0.1, 0.5])
    assert math.isclose(stats.mean, 0.5)
    std = math.sqrt((0.16 + 0 + 0.16 + 0) / 4)
    assert math.isclose(stats.std, std)
    expected = [(r - 0.5) / (std + ADVANTAGE_EPS) for r in (0.9, 0.5, 0.1, 0.5)]
    assert stats.advantages == pytest.approx(expected)
    assert stats.scored == 4


def test_group_stats_leave_failed_candidates_out() -> None:
    stats = group_stats([1.0, None, 0.0, None])
    assert stats.mean == 0.5
    assert stats.std == 0.5
    assert stats.advantages[1] is None and stats.advantages[3] is None
    assert stats.advantages[0] == pytest.approx(0.5 / (0.5 + ADVANTAGE_EPS))
    assert stats.scored == 2


def test_group_with_no_spread_has_zero_advantages() -> None:
    stats = group_stats([0.7, 0.7, 0.7])
    assert stats.std == 0.0
    assert stats.advantages == [0.0, 0.0, 0.0]


def test_group_where_everything_failed() -> None:
    stats = group_stats([None, None])
    assert stats.mean is None and stats.std is None
    assert stats.advantages == [None, None]
    assert stats.scored == 0
