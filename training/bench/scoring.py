"""Score bench items through a critic: a running server (the client) or an in-process service.

Both expose the client's scoring methods and return the protocol's responses, so the bench has one
code path; each split says which method its items take. Items with the same inputs (an editing
pair rated on both dimensions) are scored once. An item the critic failed on keeps its error and
no score: it is counted, never 0.

A request that fails fails its chunk's items only, and the run goes on. A task whose critic is
switched off is skipped as a whole. An error no later request can escape (a refused API key, no
server at all) stops the run; what was scored before it is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients import AsyncRewardClient
from clients.errors import FirmError, NoServerAvailable, NotFound, Unauthorized
from clients.protocol import (
    DimensionScore,
    ScoreMode,
)
from training.bench.data import BenchItem
from training.bench.splits import SPLITS, Split

FATAL = (Unauthorized, NoServerAvailable)  # every later request would fail the same way


class BenchAborted(Exception):
    """No further request can succeed: the run stops and keeps what it has."""


class _TaskSkipped(Exception):
    """The task's critic is switched off on the server."""


@dataclass(frozen=True)
class Prediction:
    written: int | None  # the score the critic wrote
    expected: float | None  # its probability-weighted mean, when the engine reports one
    value: float | None  # what is compared with the human score (per the score mode)
    reasoning: str | None = None
    error: str | None = None


@dataclass
class BenchScores:
    """A prediction per item, in order, and what kept items from being scored."""

    predictions: list[Prediction]
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why none of its items was scored
    aborted: str | None = None  # why the run stopped early


def _prediction(score: DimensionScore | None, error: Any, mode: ScoreMode) -> Prediction:
    if score is None or score.score is None:
        why = str(error) if error is not None else "no score"
        return Prediction(None, None, None, error=why)
    value = score.expected if mode == "expected" else float(score.score)
    if value is None:
        return Prediction(score.score, None, None, error="no_score_probabilities: the engine gave no expected score")
    return Prediction(score.score, score.expected, value, reasoning=score.reasoning)


def _chunk_failed(exc: FirmError) -> Prediction:
    """What a failed request leaves its items with; raises when the task or the whole run cannot go on."""
    if isinstance(exc, FATAL):
        raise BenchAborted(str(exc)) from exc
    if isinstance(exc, NotFound):
        raise _TaskSkipped(str(exc)) from exc
    return Prediction(None, None, None, error=f"request_failed: {exc}")


Done = dict[int, Prediction]  # position of the item in the bench -> its prediction


async def _score_split(
    scorer: AsyncRewardClient,
    split: Split,
    items: Sequence[tuple[int, BenchItem]],
    mode: ScoreMode,
    chunk: int,
    done: Done,
) -> None:
    same: dict[tuple[tuple[Path, ...], str, str | None], list[tuple[int, BenchItem]]] = {}
    for n, item in items:
        same.setdefault((item.images, item.text, item.requirement), []).append((n, item))
    keys = list(same)
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        try:
            reply = await split.request(scorer, [same[key][0][1] for key in part], mode)
        except FirmError as exc:
            failed = _chunk_failed(exc)
            done.update((n, failed) for key in part for n, _ in same[key])
            continue
        for key, result in zip(part, reply.results, strict=True):
            done.update(
                (n, _prediction(getattr(result, split.dimension(item)), result.error, mode)) for n, item in same[key]
            )


async def score_items(
    scorer: AsyncRewardClient,
    items: Sequence[BenchItem],
    mode: ScoreMode = "argmax",
    chunk: int = 32,
    served: set[str] | None = None,
) -> BenchScores:
    """Score every item of the tasks in `served` (default: all), at most `chunk` items a request."""
    scores = BenchScores(predictions=[])
    done: Done = {}
    for split in SPLITS:
        task = split.task
        group = [(n, item) for n, item in enumerate(items) if item.task == task]
        if not group:
            continue
        if served is not None and task not in served:
            scores.skipped[task] = f"the {task} critic is switched off on this server"
            continue
        try:
            await _score_split(scorer, split, group, mode, chunk, done)
        except _TaskSkipped as exc:
            scores.skipped[task] = str(exc)
        except BenchAborted as exc:
            scores.aborted = str(exc)
            break
    for n, item in enumerate(items):
        if item.task in scores.skipped:
            prediction = Prediction(None, None, None, error=f"skipped: {scores.skipped[item.task]}")
        elif n in done:
            prediction = done[n]
        else:
            prediction = Prediction(None, None, None, error=f"not_scored: the run stopped: {scores.aborted}")
        scores.predictions.append(prediction)
    return scores
