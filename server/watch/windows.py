"""Per-task tallies over time: the last window next to a baseline, and a timeline of short buckets.

A bucket holds `bucket_s` seconds of one task's items: each dimension's 1-5 histogram, its score /
expected disagreement, the rewards' sum and sum of squares, and the failure and group counts. The
window is the buckets of the last `window_s` seconds; the baseline is everything scored in the
first `baseline_s` seconds after start, or a window pinned later. Memory is bounded by the number
of buckets kept (`TIMELINE_POINTS`), whatever the traffic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

SCORES = (1, 2, 3, 4, 5)
MAX_SCORE = SCORES[-1]
TIMELINE_POINTS = 120


@dataclass
class DimensionTally:
    histogram: list[int] = field(default_factory=lambda: [0] * len(SCORES))
    disagreement: float = 0.0  # sum of |score - expected| over the scores that have an expected value
    with_expected: int = 0

    def add(self, score: int, expected: float | None) -> None:
        self.histogram[score - SCORES[0]] += 1
        if expected is not None:
            self.disagreement += abs(score - expected)
            self.with_expected += 1

    def merge(self, other: DimensionTally) -> None:
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]
        self.disagreement += other.disagreement
        self.with_expected += other.with_expected

    def view(self) -> dict[str, Any]:
        count = sum(self.histogram)
        return {
            "histogram": list(self.histogram),
            "count": count,
            "max_share": self.histogram[-1] / count if count else None,
            "disagreement": self.disagreement / self.with_expected if self.with_expected else None,
        }


@dataclass
class Tally:
    """Counts of one stretch of time for one task."""

    dimensions: dict[str, DimensionTally]
    items: int = 0
    rewards: int = 0
    reward_sum: float = 0.0
    reward_squares: float = 0.0
    parse_failures: int = 0
    engine_errors: int = 0
    failures: int = 0
    groups: int = 0
    zero_spread: int = 0
    unchanged: int = 0
    flagged: int = 0

    @classmethod
    def empty(cls, dimensions: Sequence[str]) -> Tally:
        return cls({name: DimensionTally() for name in dimensions})

    def merge(self, other: Tally) -> None:
        for name, tally in other.dimensions.items():
            self.dimensions[name].merge(tally)
        for counter in fields(self):  # every count, a new one included
            if counter.name != "dimensions":
                setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))

    def add_reward(self, reward: float) -> None:
        self.rewards += 1
        self.reward_sum += reward
        self.reward_squares += reward * reward

    def reward_moments(self) -> tuple[float | None, float | None]:
        if not self.rewards:
            return None, None
        mean = self.reward_sum / self.rewards
        return mean, math.sqrt(max(self.reward_squares / self.rewards - mean * mean, 0.0))

    def view(self) -> dict[str, Any]:
        mean, std = self.reward_moments()

        def rate(count: int, total: int) -> float | None:
            return count / total if total else None

        return {
            "items": self.items,
            "reward_mean": mean,
            "reward_std": std,
            "parse_failure_rate": rate(self.parse_failures, self.items),
            "engine_error_rate": rate(self.engine_errors, self.items),
            "failure_rate": rate(self.failures, self.items),
            "zero_spread_rate": rate(self.zero_spread, self.groups),
            "groups": self.groups,
            "unchanged": self.unchanged,
            "flagged": self.flagged,
            "dimensions": {name: tally.view() for name, tally in self.dimensions.items()},
        }


def summed(tallies: Iterable[Tally], dimensions: Sequence[str]) -> Tally:
    total = Tally.empty(dimensions)
    for tally in tallies:
        total.merge(tally)
    return total


class Windows:
    """One task's timeline of buckets, its window and its baseline."""

    def __init__(self, dimensions: Sequence[str], *, started: float, window_s: float, baseline_s: float) -> None:
        self.dimensions = tuple(dimensions)
        self.started, self.window_s, self.baseline_s = started, window_s, baseline_s
        self.bucket_s = max(window_s / 10, 1.0)
        self.buckets: deque[tuple[float, Tally]] = deque(maxlen=TIMELINE_POINTS)
        self.baseline = Tally.empty(dimensions)
        self.pinned_at: float | None = None

    def bucket(self, now: float) -> Tally:
        """The bucket `now` falls in, made when it is the first of its stretch."""
        start = now - (now - self.started) % self.bucket_s
        if not self.buckets or self.buckets[-1][0] != start:
            self.buckets.append((start, Tally.empty(self.dimensions)))
        return self.buckets[-1][1]

    def in_baseline(self, now: float) -> bool:
        return self.pinned_at is None and now - self.started < self.baseline_s

    def window(self, now: float) -> Tally:
        return summed((t for start, t in self.buckets if start + self.bucket_s > now - self.window_s), self.dimensions)

    def pin(self, now: float) -> None:
        """Make the last window the baseline from now on."""
        self.baseline = self.window(now)
        self.pinned_at = now

    def view(self, now: float) -> dict[str, Any]:
        return {
            "window": self.window(now).view(),
            "baseline": self.baseline.view(),
            "baseline_kind": "pinned" if self.pinned_at is not None else "first",
            "baseline_s": self.baseline_s,  # how long after start the first baseline fills (--watch-baseline-s)
            "baseline_open": self.in_baseline(now),
            "timeline": [
                {"time": start, "items": t.items, "reward_mean": m, "reward_std": s}
                for start, t in self.buckets
                for m, s in [t.reward_moments()]
            ],
        }
