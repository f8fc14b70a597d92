"""What both pipelines share: the settings of a run and the check that an answer fits its judge."""

from __future__ import annotations

import asyncio
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from clients.protocol import Task
from server.judges import JUDGES, Judge
from server.prompts.release import ReleasedPrompt
from server.prompts.sets import judges_for
from training.curation.chat import ChatClient, image_data_url
from training.manifest import Row
from training.records import SERVED_PIXEL_BUDGET, AnswerMismatch, checked_answer, relative_path


class BadImage(ValueError):
    """An image file Pillow cannot decode: its item fails, the run goes on."""


class Pipeline(Protocol):
    """Turns one manifest row into its records (one per judge), or raises why it could not."""

    task: str
    judges: tuple[str, ...]
    required: tuple[str, ...]

    def clients(self) -> dict[str, ChatClient]: ...

    async def curate(self, row: Row) -> list[dict[str, Any]]: ...


class PipelineKind(Protocol):
    """A pipeline class as firm-curate offers it, one subcommand per task: what its flags and help need
    before it is built, and its constructor (the two steps' clients, the context, the two steps' prompts)."""

    task: Task  # the task whose critic the records train
    summary: str  # what the pipeline does, for the subcommand's help
    steps: tuple[tuple[str, str], tuple[str, str]]  # (name, teacher's role) of the first and second step
    fields: tuple[str, ...]  # the manifest columns it reads (--field)
    required: tuple[str, ...]  # those an item must have
    # The longest answer kept by default. The served critic writes at most its task's max_new_tokens (firm-serve
    # --<task>-max-new-tokens); English reasoning runs at about 3.5 characters a token, so the limit leaves room
    # for the format around it and for wordier text; firm-train counts the exact tokens with the tokenizer.
    max_answer_chars: int

    def __call__(
        self,
        first: ChatClient,
        second: ChatClient,
        context: Context,
        first_prompt: string.Template,
        second_prompt: string.Template,
        /,
    ) -> Pipeline: ...


def _no_release(names: Sequence[str]) -> Mapping[str, ReleasedPrompt]:
    raise ValueError("the release's prompts need a prompt source")


@dataclass
class Context:
    """Where images are read from and records point to, and the critic's answer budget."""

    image_root: Path
    records_dir: Path
    max_answer_chars: int  # the longest answer a record may hold: what the served critic can write (pipeline's own)
    pixel_budget: int | None = SERVED_PIXEL_BUDGET
    templates: Mapping[str, Path | None] = field(default_factory=dict)
    prompts: str = "own"  # the prompt set records are rendered with: own, firm or a directory
    released: Callable[[Sequence[str]], Mapping[str, ReleasedPrompt]] | None = None  # for prompts="firm"
    _judges: dict[str, Judge] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Read once per run, and checked before any teacher is called.
        self._judges = judges_for("", list(JUDGES), self.prompts, self.released or _no_release, self.templates)

    def judge(self, name: str) -> Judge:
        return self._judges[name]

    async def data_urls(self, *paths: Path) -> list[str]:
        """Data URLs of image files, encoded off the event loop."""
        return await asyncio.to_thread(lambda: [self._data_url(p) for p in paths])

    def _data_url(self, path: Path) -> str:
        try:
            return image_data_url(path, self.pixel_budget)
        except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # how Pillow refuses a bad file
            raise BadImage(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc

    def image_refs(self, *paths: Path) -> list[str]:
        return [relative_path(p, self.records_dir) for p in paths]

    def answer(self, judge_name: str, answer: str, score: int) -> str:
        """The critic's answer, once the server's parser reads `score` from it and it fits the format."""
        limit = self.max_answer_chars
        if len(answer) > limit:
            raise AnswerMismatch(
                f"{judge_name}: the answer has {len(answer)} characters, over --max-answer-chars {limit}"
            )
        regex = JUDGES[judge_name].constraint.regex
        if regex is not None and re.fullmatch(regex, answer, re.DOTALL) is None:
            raise AnswerMismatch(f"{judge_name}: the answer does not fit the judge's format {regex}")
        return checked_answer(judge_name, answer, score)
