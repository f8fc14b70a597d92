"""From judge verdicts to the response's view: dimensions, rewards, item errors.

Plain functions of the parsed outcomes, driven by the task table, so the reward arithmetic of
every task and route is one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clients.protocol import (
    DimensionScore,
    EditResult,
    GenResult,
    ItemError,
    QualityScore,
    QualitySubscores,
    ResolvedOptions,
    ScoreMode,
    ScoringResponse,
)
from server import rewards
from server.judges import JudgeOutcome
from server.tasks import ServerTask


@dataclass
class Judged:
    outcomes: dict[str, JudgeOutcome] = field(default_factory=dict)
    error: ItemError | None = None


def dimension(
    outcome: JudgeOutcome | None, mode: ScoreMode, reasoning: bool
) -> tuple[DimensionScore | None, float | None]:
    """The response's view of one dimension and the 1-5 value that feeds the reward.

    A judge that writes one score gives it; a judge that writes several subscores (quality) gives
    the weakest of them, and so the weakest expected value, with the subscores alongside.
    """
    if outcome is None:
        return None, None
    if list(outcome.scores) == ["score"]:
        score, expected = outcome.scores["score"], outcome.expected["score"]
        extra: dict[str, Any] = {}
        view: type[DimensionScore] = DimensionScore
    else:
        parts = list(outcome.expected.values())
        expected = None if None in parts else min(e for e in parts if e is not None)
        score = min(outcome.scores.values())
        extra, view = {"subscores": QualitySubscores(**outcome.scores)}, QualityScore
    value = float(score) if mode == "argmax" else expected
    dim = view(
        score=score,
        expected=expected,
        normalized=None if value is None else rewards.normalize(value),
        reasoning=outcome.reasoning if reasoning else None,
        **extra,
    )
    return dim, value


def reward(judged: Judged, values: Sequence[float | None], options: ResolvedOptions) -> float | None:
    """The item's reward, or None with the reason set on the item: never 0 for a failure."""
    if judged.error is not None:
        return None
    primary, secondary = values
    if primary is None or secondary is None:
        judged.error = ItemError(
            code="no_score_probabilities",
            message="score_mode 'expected' needs the score-token probabilities, which the engine did not give",
        )
        return None
    return rewards.scored_reward(primary, secondary, options.weights)


def task_results(
    task: ServerTask, ids: Sequence[str], judged: Sequence[Judged], options: ResolvedOptions, reasoning: bool
) -> list[EditResult | GenResult]:
    """One result per item: each dimension from its judge, then the task's gated reward."""
    results = []
    for item_id, item in zip(ids, judged, strict=True):
        views: dict[str, DimensionScore | None] = {}
        values: list[float | None] = []
        for name, judge in zip(task.spec.dimensions, task.judges, strict=True):
            views[name], value = dimension(item.outcomes.get(judge), options.score_mode, reasoning)
            values.append(value)
        score = reward(item, values, options)
        results.append(task.spec.result(id=item_id, **views, reward=score, error=item.error))
    return results


def without_reasoning(response: ScoringResponse) -> ScoringResponse:
    results = []
    for result in response.results:
        dims = {
            name: value.model_copy(update={"reasoning": None})
            for name, value in result
            if isinstance(value, DimensionScore)
        }
        results.append(result.model_copy(update=dims))
    return response.model_copy(update={"results": results})
