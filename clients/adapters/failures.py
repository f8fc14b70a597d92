"""What a trainer adapter puts in place of a reward the server could not give.

The server and the client report a failed item as a null reward, never a number. Trainers that
have no notion of a mask turn one NaN into NaN advantages for the whole prompt group, so the
adapters for them substitute a value, chosen by `on_failure`:

- `"nan"`: leave the failure as NaN (or `None` where the host uses that for "no reward").
- `"group_mean"`: the mean of the scored items of the same prompt group in the call, so the
  failed item's advantage comes out at about 0. A group with no scored item gets the mean of
  every scored item in the call. A call with no scored item at all raises `RewardsUnavailable`.
- a number: that value, for example `0.0`, which counts a failure as the worst reward.

    >>> import math
    >>> fill_failures([0.2, math.nan, 0.6, math.nan], ["a", "a", "a", "b"], "group_mean").tolist()
    [0.2, 0.4, 0.6, 0.4]
    >>> fill_failures([0.2, math.nan], ["a", "a"], 0.0).tolist()
    [0.2, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np

OnFailure = Literal["nan", "group_mean"] | float


Failures = list[tuple[int, str]]  # (index in the call, reason)


def unscored(results: Sequence[Any], failed: np.ndarray) -> tuple[Failures, str]:
    """The call's failed items as (index, reason), their reason the result's error, and the first reason
    (empty when none failed), which the log and `fill_failures` name."""
    errors = [(i, str(r.error or "no reward")) for i, r in enumerate(results) if failed[i]]
    return errors, errors[0][1] if errors else ""


class RewardsUnavailable(RuntimeError):
    """No item of a call was scored, so `group_mean` has nothing to take a mean of."""


def check_on_failure(on_failure: OnFailure) -> OnFailure:
    """The setting itself, once it is known to be one of the accepted values."""
    if on_failure in ("nan", "group_mean"):
        return on_failure
    if isinstance(on_failure, bool) or not isinstance(on_failure, int | float) or not math.isfinite(on_failure):
        raise ValueError(f"on_failure must be 'nan', 'group_mean' or a finite number, got {on_failure!r}")
    return float(on_failure)


def fill_failures(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable],
    on_failure: OnFailure,
    reason: str = "",
) -> np.ndarray:
    """`values` (float64, NaN where an item failed) with every NaN replaced as `on_failure` says.

    `groups` names each item's prompt group (the prompt text, as the trainers group by it).
    `reason` goes into the error raised when nothing in the call was scored.
    """
    filled = np.array(values, dtype=np.float64)
    if len(groups) != len(filled):
        raise ValueError(f"groups: expected {len(filled)}, got {len(groups)}")
    failed = np.isnan(filled)
    if on_failure == "nan" or not failed.any():
        return filled
    if on_failure != "group_mean":
        filled[failed] = float(on_failure)
        return filled
    if failed.all():
        raise RewardsUnavailable(
            f"none of the {len(filled)} items was scored, so there is no mean to stand in for them"
            + (f"; first failure: {reason}" if reason else "")
        )
    batch_mean = float(filled[~failed].mean())
    keys = list(groups)
    for key in {keys[i] for i in np.flatnonzero(failed)}:
        members = np.array([k == key for k in keys])
        scored = members & ~failed
        filled[members & failed] = float(filled[scored].mean()) if scored.any() else batch_mean
    return filled
