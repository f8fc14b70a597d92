"""The reward service as the rollout loop sees it: submit a group, collect its rewards later.

Calls run on the client's own event-loop thread, so a group is being scored while the worker
samples the next one. A failed call or item gives a null reward (masked in the loss), never 0.
The task's entry (`rl_workers.tasks`) says which group route scores it and which dimensions its
results carry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import ValidationError

from clients import RewardClient
from clients.errors import FirmError, RequestFailed, Unauthorized
from clients.protocol import ScoreMode, ScoringResponse
from rl_workers.generators.base import Condition
from rl_workers.tasks import rollout_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRewards:
    rewards: list[float | None]
    components: dict[str, list[float | None]]  # normalised 0-1 score per dimension
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r is None for r in self.rewards)


def rewards_of(reply: ScoringResponse, dimensions: Sequence[str]) -> GroupRewards:
    """A group reply's rewards and each of the task's `dimensions`, normalised, None where missing."""
    components: dict[str, list[float | None]] = {}
    for name in dimensions:
        dims = [getattr(r, name) for r in reply.results]
        components[name] = [None if d is None else d.normalized for d in dims]
    return GroupRewards(
        rewards=[r.reward for r in reply.results],
        components=components,
        errors=[f"{i}: {reason}" for i, reason in reply.errors()],
    )


def failed_group(n: int, dimensions: Sequence[str], why: str) -> GroupRewards:
    """A group none of whose samples got a reward, each carrying `why`."""
    return GroupRewards([None] * n, {name: [None] * n for name in dimensions}, [f"{i}: {why}" for i in range(n)])


class PendingRewards:
    """A group being scored. The client is not strict, so a call that failed after its retries comes
    back as a reply whose every item has a null reward and `request_failed`. Anything else that goes
    wrong with the call does the same here, logged with its traceback: a rank that raised would leave
    the other ranks waiting in their next all-reduce."""

    def __init__(self, call: Future[Any], dimensions: Sequence[str], n: int) -> None:
        self._call = call
        self._dimensions = tuple(dimensions)
        self._n = n

    def result(self) -> GroupRewards:
        try:
            return rewards_of(self._call.result(), self._dimensions)
        except Exception as exc:  # counted as failed samples (null rewards), never as a score
            log.exception("scoring a group failed unexpectedly")
            return failed_group(self._n, self._dimensions, f"request_failed: {type(exc).__name__}: {exc}")


class RemoteCritic:
    """Scores GRPO groups through the reward server's group route of the task (edit: CME, gen: QMA)."""

    def __init__(
        self,
        task: str,
        base_urls: str | Sequence[str] | None = None,
        *,
        client: RewardClient | None = None,
        score_mode: ScoreMode | None = None,
    ) -> None:
        self._entry = rollout_task(task)
        self.task = self._entry.spec.name
        self.score_mode = score_mode
        # not strict: a failed item or call comes back as a null reward, it does not stop training
        self._client = client or RewardClient(base_urls, strict=False)

    def submit(
        self, condition: Condition, images: Sequence[Image.Image], source: Image.Image | None = None
    ) -> PendingRewards:
        """Start scoring one group (edits against `source`, default the condition's); returns at once."""
        options = {"group_id": condition.id or None, "score_mode": self.score_mode}
        call = self._entry.submit_group(self._client, condition, images, source, options)
        return PendingRewards(call, self._entry.spec.dimensions, len(images))

    def problem(self) -> str | None:
        """Why this critic cannot score the task's groups, or None when it can: the server is unreachable,
        refuses the API key, does not serve the task's critic, or is not ready. Checked before training,
        since every later failure only masks rewards."""
        where = ", ".join(self._client.config.base_urls)
        try:
            models = self._client.models()
        except Unauthorized as exc:
            return f"the reward server at {where} refused the API key (FIRM_API_KEY): {exc}"
        except (RequestFailed, OSError) as exc:
            return f"cannot reach the reward server at {where} (is firm-serve running there?): {exc}"
        except (FirmError, ValidationError) as exc:
            return f"the reward server at {where} did not list its critics (GET /v1/models): {exc}"
        needed = self.task
        served = sorted(card.task for card in models.models)
        if needed not in served:
            return (
                f"the reward server at {where} does not serve the {needed} critic that --task {self.task} needs "
                f"(it serves: {', '.join(served) or 'nothing'})"
            )
        try:
            state = self._client.readiness().models.get(needed, "unknown")
        except (FirmError, OSError) as exc:
            return f"the reward server at {where} did not say whether it is ready (GET /readyz): {exc}"
        if state not in ("ready", "degraded"):  # a degraded critic still scores; its watch page says why
            return f"the reward server at {where} is not ready to score with the {needed} critic: it is {state}"
        return None

    def close(self) -> None:
        self._client.close()
