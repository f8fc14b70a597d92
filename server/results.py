"""From judge verdicts to the response's view: dimensions, rewards, item errors.

Plain functions of the parsed outcomes, so the reward arithmetic of every route is one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from clients.protocol import (
    DimensionScore,
    EditGroupResponse,
    EditResult,
    EditScoreResponse,
    GenGroupResponse,
    GenResult,
    GenScoreResponse,
    ItemError,
    QualityScore,
    QualitySubscores,
    RewardWeights,
    ScoreMode,
)
from server import rewards
from server.judges import JudgeOutcome

Response = TypeVar("Response", EditScoreResponse, EditGroupResponse, GenScoreResponse, GenGroupResponse)


@dataclass
class Judged:
    outcomes: dict[str, JudgeOutcome] = field(default_factory=dict)
    error: ItemError | None = None


def dimension(
    outcome: JudgeOutcome | None, key: str, mode: ScoreMode, reasoning: bool
) -> tuple[DimensionScore | None, float | None]:
    """The response's view of one dimension and the 1-5 value that feeds the reward."""
    if outcome is None:
        return None, None
    score, expected = outcome.scores[key], outcome.expected[key]
    value = float(score) if mode == "argmax" else expected
    dim = DimensionScore(
        score=score,
        expected=expected,
        normalized=None if value is None else rewards.normalize(value),
        reasoning=outcome.reasoning if reasoning else None,
    )
    return dim, value


def gated(
    judged: Judged,
    values: tuple[float | None, float | None],
    combine: Callable[[float, float], float],
) -> float | None:
    if judged.error is not None:
        return None
    primary, secondary = values
    if primary is None or secondary is None:
        judged.error = ItemError(
            code="no_score_probabilities",
            message="score_mode 'expected' needs the score-token probabilities, which the engine did not give",
        )
        return None
    return combine(primary, secondary)


def edit_results(
    ids: Sequence[str],
    judged: Sequence[Judged],
    mode: ScoreMode,
    weights: RewardWeights,
    reasoning: bool,
) -> list[EditResult]:
    results = []
    for item_id, item in zip(ids, judged, strict=True):
        execution, e = dimension(item.outcomes.get("edit_execution"), "score", mode, reasoning)
        consistency, c = dimension(item.outcomes.get("edit_consistency"), "score", mode, reasoning)
        reward = gated(item, (e, c), lambda p, s: rewards.cme_reward(p, s, weights))
        results.append(
            EditResult(id=item_id, execution=execution, consistency=consistency, reward=reward, error=item.error)
        )
    return results


def gen_results(
    ids: Sequence[str],
    judged: Sequence[Judged],
    mode: ScoreMode,
    weights: RewardWeights,
    reasoning: bool,
) -> list[GenResult]:
    results = []
    for item_id, item in zip(ids, judged, strict=True):
        following, i = dimension(item.outcomes.get("gen_instruction_following"), "score", mode, reasoning)
        quality, q = quality_dimension(item.outcomes.get("gen_quality"), mode, reasoning)
        reward = gated(item, (i, q), lambda p, s: rewards.qma_reward(p, s, weights))
        results.append(
            GenResult(
                id=item_id,
                instruction_following=following,
                quality=quality,
                reward=reward,
                error=item.error,
            )
        )
    return results


def quality_dimension(
    outcome: JudgeOutcome | None, mode: ScoreMode, reasoning: bool
) -> tuple[QualityScore | None, float | None]:
    """Quality is the weakest of the three subscores (and so is its expected value)."""
    if outcome is None:
        return None, None
    expected_parts = list(outcome.expected.values())
    expected = None if None in expected_parts else min(e for e in expected_parts if e is not None)
    score = min(outcome.scores.values())
    value = float(score) if mode == "argmax" else expected
    quality = QualityScore(
        score=score,
        expected=expected,
        normalized=None if value is None else rewards.normalize(value),
        reasoning=outcome.reasoning if reasoning else None,
        subscores=QualitySubscores(**outcome.scores),
    )
    return quality, value


def without_reasoning(response: Response) -> Response:
    results = []
    for result in response.results:
        dims = {
            name: value.model_copy(update={"reasoning": None})
            for name, value in result
            if isinstance(value, DimensionScore)
        }
        results.append(result.model_copy(update=dims))
    return response.model_copy(update={"results": results})
