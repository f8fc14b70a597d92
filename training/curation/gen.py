"""FIRM-Gen curation, plan-then-score.

Step 1 asks a language model to turn the prompt into a checklist of checkable requirements.
Step 2 shows a vision-language model the image with the prompt and the checklist, and asks for a
verdict per item and a 1-5 rating. The record teaches the critic to write that item-by-item
analysis itself, in the released answer format (the requirements one by one, a final analysis, the
rating line and `\\boxed{N}`), from the server's `gen_instruction_following`
prompt alone: the checklist is evidence in the record, not part of the critic's input.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from clients.tasks import GEN
from server.judges import gen_fields
from server.judges.answers import alignment_answer
from server.tasks import SERVER_TASKS
from training.curation.chat import ChatClient, user_turn
from training.curation.common import Context
from training.curation.replies import ReplyError, extract_json, score_of, text_of
from training.manifest import Row
from training.records import make_record

JUDGE = SERVER_TASKS[GEN.name].judges[0]  # the primary dimension's: instruction following
VERDICTS = ("met", "partly met", "not met")


def checklist_of(reply: dict[str, Any]) -> list[str]:
    items = reply.get("checklist")
    if not isinstance(items, list) or not items:
        raise ReplyError(f"expected a non-empty 'checklist' list, got {items!r}")
    return [text_of(item, f"checklist[{i}]") for i, item in enumerate(items)]


def requirement_checks(reply: dict[str, Any]) -> list[tuple[str, str]]:
    """The teacher's verdict on each checklist item, as (requirement, check) entries of the answer.

    >>> requirement_checks({"checks": [{"item": "a red car", "verdict": "met", "note": "a red hatchback"}]})
    [('a red car', 'Met: a red hatchback.')]
    """
    checks = reply.get("checks")
    if not isinstance(checks, list) or not checks:
        raise ReplyError(f"expected a non-empty 'checks' list, got {checks!r}")
    entries = []
    for i, check in enumerate(checks):
        if not isinstance(check, dict):
            raise ReplyError(f"checks[{i}]: expected an object, got {check!r}")
        item = text_of(check.get("item"), f"checks[{i}].item")
        verdict = text_of(check.get("verdict"), f"checks[{i}].verdict").lower()
        if verdict not in VERDICTS:
            raise ReplyError(f"checks[{i}].verdict must be one of {VERDICTS}, got {verdict!r}")
        note = check.get("note")
        detail = f": {text_of(note, f'checks[{i}].note').rstrip('.')}" if note else ""
        entries.append((_plain(item), _plain(f"{verdict.capitalize()}{detail}.")))
    return entries


def final_analysis(reply: dict[str, Any], entries: list[tuple[str, str]]) -> str:
    """The teacher's summary when it gave one, else a count of the verdicts."""
    summary = reply.get("summary")
    if isinstance(summary, str) and summary.strip():
        return _plain(summary.strip())
    met = sum(check.startswith("Met") for _, check in entries)
    return f"{met} of {len(entries)} requirements are fully met."


def _plain(text: str) -> str:
    """No backslash (the box is the answer's only one) and no line breaks inside an entry."""
    return " ".join(text.replace("\\", "/").split())


@dataclass
class GenPipeline:
    planner: ChatClient
    checker: ChatClient
    context: Context
    plan_prompt: string.Template
    check_prompt: string.Template

    task = GEN.name
    summary = "plan-then-score curation of generated images (instruction-following records)"
    steps = (
        ("plan", "language model that turns the prompt into a checklist"),
        ("check", "vision-language model that checks the image against the checklist and rates it"),
    )
    fields = ("image", "prompt", "requirement")
    max_answer_chars = 24_000
    judges = (JUDGE,)
    required = ("image", "prompt")

    def clients(self) -> dict[str, ChatClient]:
        return {"plan": self.planner, "check": self.checker}

    async def curate(self, row: Row) -> list[dict[str, Any]]:
        image = row.image("image", self.context.image_root)
        fields = gen_fields(row.text("prompt") or "", row.text("requirement"))
        teacher = {"prompt": fields["prompt"], "requirement": fields["requirement"] or "none"}
        plan = extract_json(await self.planner.complete(user_turn(self.plan_prompt.substitute(teacher))))
        checklist = checklist_of(plan)
        listed = "\n".join(f"{i}. {item}" for i, item in enumerate(checklist, 1))
        urls = await self.context.data_urls(image)
        asked = self.check_prompt.substitute(teacher, checklist=listed)
        reply = extract_json(await self.checker.complete(user_turn(asked, urls)))
        score = score_of(reply.get("score"), "score")
        entries = requirement_checks(reply)
        answer = self.context.answer(JUDGE, alignment_answer(entries, final_analysis(reply, entries), score), score)
        record = make_record(
            row.id,
            JUDGE,
            self.context.image_refs(image),
            fields,
            answer,
            score=score,
            evidence={"checklist": checklist},
            the_judge=self.context.judge(JUDGE),
        )
        return [record]
