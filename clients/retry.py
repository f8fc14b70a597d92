"""An immutable retry policy: bounded attempts, exponential backoff with jitter, Retry-After honoured."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

# Statuses a later attempt may get past: timeouts, conflicts, throttling and passing server faults.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a `Retry-After` header asks for; None when absent or an HTTP date."""
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based).

        >>> RetryPolicy(jitter=0.0).delay(0), RetryPolicy(jitter=0.0).delay(3)
        (0.5, 4.0)
        >>> RetryPolicy(jitter=0.0).delay(0, retry_after=7.0)
        7.0
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        base = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        factor = 1.0 + self.jitter * (2.0 * (rng or random).random() - 1.0)
        return base * factor
