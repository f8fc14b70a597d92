"""FIRM reward arithmetic: normalisation, the gated CME and QMA rewards, GRPO group statistics.

Both rewards have the form R = P * (w1 + w2 * S): the primary dimension P (edit execution,
instruction following) gates the reward, so a candidate that ignores the instruction earns
nothing however well it scores on the secondary dimension S (consistency, quality).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from clients.protocol import GroupStats, RewardWeights
from clients.tasks import TASKS

CME_WEIGHTS = TASKS["edit"].default_weights
QMA_WEIGHTS = TASKS["gen"].default_weights
ADVANTAGE_EPS = 1e-4


def normalize(score: float) -> float:
    """Map a 1-5 score onto [0, 1].

    >>> normalize(1), normalize(3), normalize(5)
    (0.0, 0.5, 1.0)
    """
    if not 1.0 <= score <= 5.0:
        raise ValueError(f"score must be in [1, 5], got {score}")
    return (score - 1.0) / 4.0


def gated_reward(primary: float, secondary: float, weights: RewardWeights) -> float:
    """R = P * (w1 + w2 * S) on normalised scores, with the weights divided by w1 + w2 and R clamped
    to [0, 1], as the release composes its rewards.

    >>> gated_reward(1.0, 0.5, CME_WEIGHTS)
    0.8
    >>> gated_reward(1.0, 0.5, RewardWeights(w1=1.0, w2=1.0))  # the same as 0.5/0.5
    0.75
    """
    total = weights.w1 + weights.w2
    return min(1.0, max(0.0, primary * (weights.w1 + weights.w2 * secondary) / total))


def scored_reward(primary: float, secondary: float, weights: RewardWeights) -> float:
    """Every task's reward from its two 1-5 scores: the primary one gates, the secondary one shades.

    >>> scored_reward(5, 3, CME_WEIGHTS) == cme_reward(5, 3)
    True
    """
    return gated_reward(normalize(primary), normalize(secondary), weights)


def cme_reward(execution: float, consistency: float, weights: RewardWeights = CME_WEIGHTS) -> float:
    """CME editing reward from 1-5 execution and consistency scores.

    An unchanged image (consistency 5, execution 1) earns nothing:

    >>> cme_reward(1, 5)
    0.0
    >>> round(cme_reward(5, 3), 6)
    0.8
    """
    return gated_reward(normalize(execution), normalize(consistency), weights)


def qma_reward(instruction: float, quality: float, weights: RewardWeights = QMA_WEIGHTS) -> float:
    """QMA generation reward from 1-5 instruction-following and quality scores.

    >>> round(qma_reward(5, 1), 6)
    0.4
    """
    return gated_reward(normalize(instruction), normalize(quality), weights)


@dataclass(frozen=True)
class _Moments:
    mean: float
    std: float


def _moments(values: Sequence[float]) -> _Moments:
    if min(values) == max(values):  # exactly zero spread, so a tied group gets advantages of exactly 0
        return _Moments(values[0], 0.0)
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return _Moments(mean, math.sqrt(var))


def group_stats(rewards: Sequence[float | None], eps: float = ADVANTAGE_EPS) -> GroupStats:
    """Mean, population std and advantages (r - mean) / (std + eps) over the non-null rewards.

    Failed candidates (None) are left out of the statistics and get a None advantage.

    >>> s = group_stats([1.0, None, 0.0])
    >>> s.mean, s.std, s.scored
    (0.5, 0.5, 2)
    >>> [None if a is None else round(a, 3) for a in s.advantages]
    [1.0, None, -1.0]
    """
    scored = [r for r in rewards if r is not None]
    if not scored:
        return GroupStats(mean=None, std=None, advantages=[None] * len(rewards), scored=0)
    m = _moments(scored)
    advantages = [None if r is None else (r - m.mean) / (m.std + eps) for r in rewards]
    return GroupStats(mean=m.mean, std=m.std, advantages=advantages, scored=len(scored))
