"""Score bench items through a critic: a running server (the client) or an in-process service.

Both expose `score_edits` and `score_generations` with the client's arguments and return the
protocol's responses, so the bench has one code path. An editing pair rated on both dimensions is
scored once. An item the critic failed on keeps its error and no score: it is counted, never 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clients.images import encode
from clients.protocol import (
    DimensionScore,
    EditScoreRequest,
    EditScoreResponse,
    GenScoreRequest,
    GenScoreResponse,
    ScoreMode,
)
from training.bench.data import BenchItem


class Scorer(Protocol):
    async def score_edits(self, sources: Any, edited: Any, instructions: Any, **options: Any) -> EditScoreResponse: ...

    async def score_generations(self, images: Any, prompts: Any, **options: Any) -> GenScoreResponse: ...


@dataclass(frozen=True)
class Prediction:
    written: int | None  # the score the critic wrote
    expected: float | None  # its probability-weighted mean, when the engine reports one
    value: float | None  # what is compared with the human score (per the score mode)
    reasoning: str | None = None
    error: str | None = None


def _prediction(score: DimensionScore | None, error: Any, mode: ScoreMode) -> Prediction:
    if score is None or score.score is None:
        why = f"{error.code}: {error.message}" if error is not None else "no score"
        return Prediction(None, None, None, error=why)
    value = score.expected if mode == "expected" else float(score.score)
    if value is None:
        return Prediction(score.score, None, None, error="no_score_probabilities: the engine gave no expected score")
    return Prediction(score.score, score.expected, value, reasoning=score.reasoning)


async def _score_edit_items(
    scorer: Scorer, items: Sequence[BenchItem], mode: ScoreMode, chunk: int
) -> list[Prediction]:
    pairs: dict[tuple[Path, Path, str], int] = {}
    for item in items:
        pairs.setdefault((item.images[0], item.images[1], item.text), len(pairs))
    keys = list(pairs)
    results = []
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        reply = await scorer.score_edits(
            [k[0] for k in part], [k[1] for k in part], [k[2] for k in part], score_mode=mode, return_reasoning=True
        )
        results += reply.results
    predictions = []
    for item in items:
        result = results[pairs[(item.images[0], item.images[1], item.text)]]
        predictions.append(_prediction(getattr(result, item.group), result.error, mode))
    return predictions


async def _score_gen_items(scorer: Scorer, items: Sequence[BenchItem], mode: ScoreMode, chunk: int) -> list[Prediction]:
    predictions = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        reply = await scorer.score_generations(
            [i.images[0] for i in part],
            [i.text for i in part],
            requirements=[i.requirement for i in part],
            score_mode=mode,
            return_reasoning=True,
        )
        predictions += [_prediction(r.instruction_following, r.error, mode) for r in reply.results]
    return predictions


async def score_items(
    scorer: Scorer, items: Sequence[BenchItem], mode: ScoreMode = "argmax", chunk: int = 32
) -> list[Prediction]:
    """A prediction per item, in order."""
    edits = [i for i in items if i.task == "edit"]
    gens = [i for i in items if i.task == "gen"]
    by_id: dict[int, Prediction] = {}
    for group, score in ((edits, _score_edit_items), (gens, _score_gen_items)):
        if group:
            for item, prediction in zip(group, await score(scorer, group, mode, chunk), strict=True):
                by_id[id(item)] = prediction
    return [by_id[id(item)] for item in items]


class InProcessScorer:
    """The scoring service of `firm-serve` built in this process from its flags (no HTTP)."""

    def __init__(self, serve_args: Sequence[str]) -> None:
        from server.assembly import build_service
        from server.cli import load_settings
        from server.metrics import Metrics

        self.settings = load_settings(serve_args)
        self.service = build_service(self.settings, Metrics())

    async def start(self) -> None:
        await self.service.start()

    async def aclose(self) -> None:
        await self.service.close()

    async def score_edits(self, sources: Any, edited: Any, instructions: Any, **options: Any) -> EditScoreResponse:
        items = [
            {"id": str(i), "source": encode(s), "edited": encode(e), "instruction": t}
            for i, (s, e, t) in enumerate(zip(sources, edited, instructions, strict=True))
        ]
        return await self.service.score_edits(EditScoreRequest(items=items, **options))

    async def score_generations(self, images: Any, prompts: Any, **options: Any) -> GenScoreResponse:
        requirements = options.pop("requirements", None) or [None] * len(images)
        items = [
            {"id": str(i), "image": encode(image), "prompt": prompt}
            | ({"requirement": requirement} if requirement else {})
            for i, (image, prompt, requirement) in enumerate(zip(images, prompts, requirements, strict=True))
        ]
        return await self.service.score_generations(GenScoreRequest(items=items, **options))
