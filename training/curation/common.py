"""What both pipelines share: the settings of a run and the check that an answer fits its judge."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.judges import JUDGES, Judge
from training.curation.chat import ChatClient, image_data_url
from training.manifest import Row
from training.records import AnswerMismatch, checked_answer, judge, relative_path


class Pipeline(Protocol):
    """Turns one manifest row into its records (one per judge), or raises why it could not."""

    task: str
    judges: tuple[str, ...]
    required: tuple[str, ...]

    def clients(self) -> dict[str, ChatClient]: ...

    async def curate(self, row: Row) -> list[dict[str, Any]]: ...


@dataclass
class Context:
    """Where images are read from and records point to, and the critic's answer budget."""

    image_root: Path
    records_dir: Path
    pixel_budget: int | None = 1024 * 1024
    max_answer_chars: int = 1000
    templates: Mapping[str, Path | None] = field(default_factory=dict)

    def judge(self, name: str) -> Judge:
        return judge(name, self.templates)

    async def data_urls(self, *paths: Path) -> list[str]:
        """Data URLs of image files, encoded off the event loop."""
        return await asyncio.to_thread(lambda: [image_data_url(p, self.pixel_budget) for p in paths])

    def image_refs(self, *paths: Path) -> list[str]:
        return [relative_path(p, self.records_dir) for p in paths]

    def answer(self, judge_name: str, answer: str, score: int) -> str:
        """The critic's answer, once the server's parser reads `score` from it and it fits the format."""
        if len(answer) > self.max_answer_chars:
            raise AnswerMismatch(
                f"{judge_name}: the answer has {len(answer)} characters, "
                f"over --max-answer-chars {self.max_answer_chars}"
            )
        regex = JUDGES[judge_name].constraint.regex
        if regex is not None and re.fullmatch(regex, answer, re.DOTALL) is None:
            raise AnswerMismatch(f"{judge_name}: the answer does not fit the judge's format {regex}")
        return checked_answer(judge_name, answer, score)


def json_answer(reasoning: str, score: int) -> str:
    """The JSON judges' answer: reasoning first, then the score in a list.

    >>> json_answer("The car is red.", 5)
    '{"reasoning": "The car is red.", "score": [5]}'
    """
    return json.dumps({"reasoning": reasoning, "score": [score]}, ensure_ascii=False)
