"""A plug-in engine for the canary tests: well-formed answers that can change after a wake.

It answers every judge as the simulated engine of `bench/sim_engine.py` does (score 4), at no cost,
and can sleep. With FIRM_DRIFT_AFTER_WAKES=N it answers 2 instead from its N-th wake on: a judge
that comes back from a sleep/wake cycle well-formed and wrong. Unset, it never changes.

    firm-serve --engine tests.drift_engine:DriftingEngine --edit-model drift --gen-model none --admin-key ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

from server.engines.base import Engine, GenerationRequest, GenerationResult, WatchedStep
from server.judges.answers import alignment_answer, json_score_answer, quality_answer

STEADY, DRIFTED = 4, 2


def answer(prompt: str, score: int) -> GenerationResult:
    """The judge's answer format for `prompt`, every score digit `score`, with its probabilities."""
    if "Instruction:" in prompt:
        text = json_score_answer("Canary verdict.", score)
    elif "Original Prompt" in prompt:
        text = alignment_answer([("A requirement", "Checked.")], "Canary analysis.", score)
    else:
        text = quality_answer((score, score, score), "Canary verdict.")
    digit = str(score)
    probs = {str(s): 0.0 for s in range(1, 6)} | {digit: 0.8, str(6 - score): 0.2}
    steps = tuple(WatchedStep(offset=i, token=digit, probs=probs) for i, char in enumerate(text) if char == digit)
    return GenerationResult(text=text, watched=steps)


class DriftingEngine(Engine):
    name: ClassVar[str] = "drifting"
    supports_sleep = True

    def __init__(self, model: str, watch_tokens: Sequence[str], **options: Any) -> None:
        super().__init__(model, watch_tokens, **options)
        after = os.environ.get("FIRM_DRIFT_AFTER_WAKES")
        self.drift_after = int(after) if after else None
        self.wakes = 0

    @property
    def score(self) -> int:
        return DRIFTED if self.drift_after is not None and self.wakes >= self.drift_after else STEADY

    async def sleep(self) -> None:
        """Nothing to offload."""

    async def wake(self) -> None:
        self.wakes += 1

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [answer(str(r.parts[-1]), self.score) for r in requests]
