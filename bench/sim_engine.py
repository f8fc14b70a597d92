"""A simulated engine for the serving benchmark: GPU-like cost, well-formed answers, no model.

Each `generate` call of n judge calls costs a + b * n seconds (FIRM_SIM_A, FIRM_SIM_B; defaults
0.5 and 0.01): a large fixed cost and a nearly free batch, as on a GPU. It answers every call
with a well-formed answer of the judge whose prompt it got, with score-token probabilities.
It wants the server's micro-batcher in front, as the transformers engine does.

    firm-serve --engine bench.sim_engine:SimulatedEngine --edit-model sim --gen-model none
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from server.engines.base import Engine, GenerationRequest, GenerationResult, WatchedStep
from server.judges.answers import alignment_answer, json_score_answer, quality_answer

# (a line of the judge's prompt, the released answer format it is answered in); every score digit is 4
ANSWERS = (
    ("Instruction:", json_score_answer("Simulated verdict.", 4)),
    ("Original Prompt", alignment_answer([("Simulated requirement", "Met.")], "Simulated analysis.", 4)),
    ("", quality_answer((4, 4, 4), "Simulated verdict.")),
)
PROBS = {"1": 0.0, "2": 0.0, "3": 0.2, "4": 0.7, "5": 0.1}


def answer(prompt: str) -> GenerationResult:
    text = next(t for key, t in ANSWERS if key in prompt)
    steps = tuple(WatchedStep(offset=i, token="4", probs=PROBS) for i, char in enumerate(text) if char == "4")
    return GenerationResult(text=text, watched=steps)


class SimulatedEngine(Engine):
    name: ClassVar[str] = "simulated"
    batches_itself: ClassVar[bool] = False

    def __init__(self, model: str, watch_tokens: Sequence[str], **options: Any) -> None:
        super().__init__(model, watch_tokens, **options)
        self.a = float(os.environ.get("FIRM_SIM_A", "0.5"))
        self.b = float(os.environ.get("FIRM_SIM_B", "0.01"))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        await asyncio.sleep(self.a + self.b * len(requests))
        return [answer(str(r.parts[-1])) for r in requests]
