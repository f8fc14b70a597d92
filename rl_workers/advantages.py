"""Group-normalised advantages: each sample is judged against the other samples of its prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ZERO_SPREAD = 1e-6


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # (G,) float32; 0 where masked
    mask: torch.Tensor  # (G,) bool; False: no reward (failed item) or a zero-spread group
    mean: float | None
    std: float | None
    zero_spread: bool  # every scored sample got the same reward: nothing to learn from this group


def group_advantages(rewards: Sequence[float | None], std_floor: float = 0.01) -> GroupAdvantages:
    """(r - mean) / max(std, std_floor) over the samples that have a reward.

    Samples without a reward (the server could not score them) are masked out, never counted as 0.
    A group whose scored rewards are all equal (or that has fewer than two) is zero-spread: all masked.

    >>> a = group_advantages([0.25, None, 0.75])
    >>> a.advantages.tolist(), a.mask.tolist()
    ([-1.0, 0.0, 1.0], [True, False, True])
    >>> group_advantages([0.5, 0.5, None]).zero_spread
    True
    """
    scored = [r for r in rewards if r is not None and not math.isnan(r)]
    present = torch.tensor([r is not None and not math.isnan(r) for r in rewards])
    if len(scored) < 2:
        return GroupAdvantages(torch.zeros(len(rewards)), torch.zeros(len(rewards), dtype=torch.bool), None, None, True)
    values = torch.tensor(scored, dtype=torch.float64)
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    if std < ZERO_SPREAD:
        return GroupAdvantages(torch.zeros(len(rewards)), torch.zeros(len(rewards), dtype=torch.bool), mean, std, True)
    advantages = torch.tensor(
        [0.0 if not ok else (r - mean) / max(std, std_floor) for r, ok in zip(rewards, present.tolist(), strict=True)],
        dtype=torch.float32,
    )
    return GroupAdvantages(advantages, present, mean, std, False)
