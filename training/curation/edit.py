"""FIRM-Edit curation, difference-first.

Step 1 shows a vision-language model the source and the edited image (not the instruction) and
asks for every visible difference. Step 2 gives a model that description and the instruction and
asks for execution and consistency grades with reasons. Describing before judging keeps the
grader from seeing what it expects to see. Each item becomes two records, one per dimension, in
the server's `edit_execution` and `edit_consistency` prompt formats, answered as the critic
should answer: `{"reasoning": "...", "score": [N]}`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from clients.tasks import EDIT
from server.judges import edit_fields
from server.judges.answers import json_score_answer
from server.tasks import SERVER_TASKS
from training.curation.chat import ChatClient, user_turn
from training.curation.common import Context
from training.curation.replies import extract_json, grade_of
from training.manifest import Row
from training.records import make_record

# The judge of each dimension the grader rates (its reply's keys are the dimensions' names).
DIMENSIONS = dict(zip(EDIT.dimensions, SERVER_TASKS[EDIT.name].judges, strict=True))


@dataclass
class EditPipeline:
    describer: ChatClient
    grader: ChatClient
    context: Context
    describe_prompt: string.Template
    grade_prompt: string.Template

    task = EDIT.name
    summary = "difference-first curation of image edits (execution and consistency records)"
    steps = (
        ("describe", "vision-language model that lists the differences between source and edited image"),
        ("grade", "model that grades execution and consistency from the differences and the instruction"),
    )
    fields = ("source", "edited", "instruction")
    max_answer_chars = 700
    judges = tuple(DIMENSIONS.values())
    required = fields

    def clients(self) -> dict[str, ChatClient]:
        return {"describe": self.describer, "grade": self.grader}

    async def curate(self, row: Row) -> list[dict[str, Any]]:
        source = row.image("source", self.context.image_root)
        edited = row.image("edited", self.context.image_root)
        instruction = row.text("instruction") or ""
        urls = await self.context.data_urls(source, edited)
        differences = await self.describer.complete(user_turn(self.describe_prompt.substitute(), urls))
        asked = self.grade_prompt.substitute(instruction=instruction, differences=differences.strip())
        reply = extract_json(await self.grader.complete(user_turn(asked)))
        images = self.context.image_refs(source, edited)
        records = []
        for dimension, judge_name in DIMENSIONS.items():
            reasoning, score = grade_of(reply.get(dimension), dimension)
            answer = self.context.answer(judge_name, json_score_answer(reasoning, score), score)
            records.append(
                make_record(
                    row.id,
                    judge_name,
                    images,
                    edit_fields(instruction),
                    answer,
                    score=score,
                    evidence={"differences": differences.strip()},
                    the_judge=self.context.judge(judge_name),
                )
            )
        return records
