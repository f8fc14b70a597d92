"""Group-normalised advantages: each sample is judged against the other samples of its prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ZERO_SPREAD = 1e-6


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # (G,) float32; 0 where masked
    mask: torch.Tensor  # (G,) bool; False: no reward (failed item) or a zero-spread group
    zero_spread: bool  # at least two samples were scored, all alike: nothing to learn from this group


def group_advantages(rewards: Sequence[float | None], std_floor: float = 0.01) -> GroupAdvantages:
    """(r - mean) / max(std, std_floor) over the samples that have a reward.

    Samples without a reward (the server could not score them) are masked out, never counted as 0.
    A group whose scored rewards are all equal is zero-spread, and one with fewer than two scored
    samples has nothing to compare: either way every sample is masked.

    >>> a = group_advantages([0.25, None, 0.75])
    >>> a.advantages.tolist(), a.mask.tolist()
    ([-1.0, 0.0, 1.0], [True, False, True])
    >>> group_advantages([0.5, 0.5, None]).zero_spread, group_advantages([None, None]).zero_spread
    (True, False)
    """
    present = [r is not None for r in rewards]
    scored = torch.tensor([r for r in rewards if r is not None], dtype=torch.float64)
    nothing = GroupAdvantages(torch.zeros(len(rewards)), torch.zeros(len(rewards), dtype=torch.bool), False)
    if len(scored) < 2:
        return nothing
    mean, std = float(scored.mean()), float(scored.std(unbiased=False))
    if std < ZERO_SPREAD:
        return GroupAdvantages(nothing.advantages, nothing.mask, True)
    scale = max(std, std_floor)
    advantages = [(r - mean) / scale if r is not None else 0.0 for r in rewards]
    return GroupAdvantages(torch.tensor(advantages, dtype=torch.float32), torch.tensor(present), False)
