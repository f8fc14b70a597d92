"""Group-normalised advantages: each sample is judged against the other samples of its prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rl_workers.distributed import Ranks, sum_across

ZERO_SPREAD = 1e-6


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # (G,) float32; 0 where masked
    mask: torch.Tensor  # (G,) bool; False: no reward (failed item) or a zero-spread group
    zero_spread: bool  # at least two samples were scored, all alike: nothing to learn from this group


def std_of_sums(n: float, total: float, total_sq: float) -> float:
    """The population std (not the unbiased estimate) of n values from their sum and sum of squares, the
    form sums take when added up across ranks; NaN for no values.

    >>> std_of_sums(2, 1.0, 1.0), std_of_sums(0, 0.0, 0.0)
    (0.5, nan)
    """
    if not n:
        return math.nan
    mean = total / n
    return math.sqrt(max(total_sq / n - mean * mean, 0.0))


def population_std(rewards: Sequence[float]) -> float:
    """The std (not the unbiased estimate) of `rewards`; NaN when there are none."""
    return std_of_sums(len(rewards), sum(rewards), sum(r * r for r in rewards))


def group_advantages(
    rewards: Sequence[float | None], std_floor: float = 0.01, *, scale: float | None = None, clip: float = 5.0
) -> GroupAdvantages:
    """(r - group mean) / max(std, std_floor), clipped to [-clip, clip], over the samples that have a reward.

    `std` is the group's own, or `scale` when given (the std of every reward of the step: Flow-GRPO's
    global_std). Samples without a reward (the server could not score them) are masked out, never
    counted as 0. A group whose scored rewards are all equal is zero-spread, and one with fewer than
    two scored samples has nothing to compare: either way every sample is masked.

    >>> a = group_advantages([0.25, None, 0.75])
    >>> a.advantages.tolist(), a.mask.tolist()
    ([-1.0, 0.0, 1.0], [True, False, True])
    >>> group_advantages([0.25, 0.75], scale=0.5).advantages.tolist()
    [-0.5, 0.5]
    >>> group_advantages([0.5, 0.5, None]).zero_spread, group_advantages([None, None]).zero_spread
    (True, False)
    """
    present = [r is not None for r in rewards]
    scored = [r for r in rewards if r is not None]
    nothing = GroupAdvantages(torch.zeros(len(rewards)), torch.zeros(len(rewards), dtype=torch.bool), False)
    if len(scored) < 2:
        return nothing
    mean, std = sum(scored) / len(scored), population_std(scored)
    if std < ZERO_SPREAD:
        return GroupAdvantages(nothing.advantages, nothing.mask, True)
    divisor = max(std if scale is None or math.isnan(scale) else scale, std_floor)
    advantages = torch.tensor([(r - mean) / divisor if r is not None else 0.0 for r in rewards], dtype=torch.float32)
    return GroupAdvantages(advantages.clamp(-clip, clip), torch.tensor(present), False)


def step_advantages(
    rewards: Sequence[Sequence[float | None]],
    *,
    std_floor: float,
    adv_std: str,
    clip: float,
    ranks: Ranks,
    device: torch.device,
) -> list[GroupAdvantages]:
    """The advantages of every group of a step. With `adv_std` "global" each group's centred rewards are
    divided by the std of every reward of the step on every rank, so each rank joins that reduction
    (whatever its own rewards: a rank whose rewards all failed must not leave the others waiting)."""
    scale = None
    if adv_std == "global":
        scored = [r for group in rewards for r in group if r is not None]
        sums = {"n": float(len(scored)), "r": sum(scored), "r2": sum(r * r for r in scored)}
        total = sum_across(sums, ranks, device)
        scale = std_of_sums(total["n"], total["r"], total["r2"]) if total["n"] else None
    elif adv_std != "group":
        raise ValueError(f"unknown adv_std {adv_std!r}")
    return [group_advantages(group, std_floor, scale=scale, clip=clip) for group in rewards]
