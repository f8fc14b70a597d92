"""What the adapters take from a host's batch, and how it becomes a scoring call of each task.

`INPUTS` holds one entry per task of `clients.tasks.TASKS`: which fields of the task's wire item a
trainer fills (the judged image, its text, and the source image or requirement when the task has
one), and which client method scores them. The adapters read the entry; none of them branches on
the task, so a new critic's task is one entry here.

    >>> INPUTS["edit"].image, INPUTS["edit"].source, INPUTS["gen"].requirement
    ('edited', 'source', 'requirement')
    >>> INPUTS["gen"].terms
    ('firm_gen', 'instruction_following', 'quality')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from clients.protocol import ScoringResponse, Task
from clients.tasks import EDIT, GEN, TaskSpec

if TYPE_CHECKING:
    from clients.client import RewardClient


def prompt_text(prompt: Any) -> str:
    """A prompt's text: the string itself, or the last text of chat messages."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [part.get("text", "") for part in content or [] if part.get("type") == "text"]
        if texts:
            return " ".join(texts)
    raise ValueError("no text found in the prompt")


def one_image_each(values: Sequence[Any], n: int, what: str, allow_paths: bool) -> list[Any]:
    """One image per item: one-element lists flattened, text (a path) refused unless `allow_paths`."""
    if len(values) != n:
        raise ValueError(f"{what}: expected one per item ({n}), got {len(values)}")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, list | tuple):
            if len(value) != 1:
                raise ValueError(f"{what}[{i}]: expected one image, got a list of {len(value)}")
            value = value[0]
        if value is None:
            raise ValueError(f"{what}[{i}] is None")
        if not allow_paths and isinstance(value, str | Path):
            raise TypeError(
                f"{what}[{i}] is text; give a PIL image, an array, a tensor or encoded bytes (text is never opened)"
            )
        out.append(value)
    return out


@dataclass(frozen=True)
class Batch:
    """One call's inputs, whatever the task: the judged images, the text each is judged against, and the
    per-item extras a task takes (None where it takes none)."""

    images: list[Any]
    texts: list[str]
    sources: list[Any] | None = None  # the images the judged ones were made from
    requirements: list[str | None] | None = None
    ids: list[str] | None = None  # echoed with each result
    options: dict[str, Any] = field(default_factory=dict)  # the client's scoring options (score_mode, timeout_s, ...)


@dataclass(frozen=True)
class TaskInputs:
    """How a trainer's per-item inputs map to one task's request: the item fields it fills, by the names
    of the task's wire item, and the client method that scores a batch of them."""

    spec: TaskSpec
    image: str  # the judged image
    text: str  # the text it is judged against
    source: str | None  # the image it was made from, for a task that compares two images
    requirement: str | None  # an optional requirement, for a task that takes one
    score: Callable[[RewardClient, Batch], ScoringResponse]

    def __post_init__(self) -> None:
        known = item_fields(self.spec)
        named = [f for f in (self.image, self.text, self.source, self.requirement) if f is not None]
        unknown = sorted(set(named) - known)
        if unknown:
            raise ValueError(f"{self.spec.name}: {unknown} are not fields of its wire item ({sorted(known)})")

    @property
    def terms(self) -> tuple[str, ...]:
        """The reward and its dimensions, as the trainers name their reward columns."""
        return (self.spec.reward_term, *self.spec.dimensions)

    @property
    def keys(self) -> tuple[str, ...]:
        """The item fields a host hands over per item, judged image first."""
        return tuple(f for f in (self.image, self.text, self.source, self.requirement) if f is not None)


def item_fields(spec: TaskSpec) -> set[str]:
    """The fields of one item of the task's score request (`items: list[<Item>]`)."""
    (item,) = get_args(spec.score_request.model_fields["items"].annotation)
    return set(item.model_fields)


def _score_edits(client: RewardClient, batch: Batch) -> ScoringResponse:
    return client.score_edits(batch.sources, batch.images, batch.texts, ids=batch.ids, **batch.options)


def _score_generations(client: RewardClient, batch: Batch) -> ScoringResponse:
    return client.score_generations(
        batch.images, batch.texts, requirements=batch.requirements, ids=batch.ids, **batch.options
    )


INPUTS: dict[Task, TaskInputs] = {
    entry.spec.name: entry
    for entry in (
        TaskInputs(EDIT, image="edited", text="instruction", source="source", requirement=None, score=_score_edits),
        TaskInputs(GEN, image="image", text="prompt", source=None, requirement="requirement", score=_score_generations),
    )
}


def task_inputs(task: str) -> TaskInputs:
    """The inputs entry of a task by its name, with the known names in the error."""
    if task not in INPUTS:
        raise ValueError(f"task must be one of {', '.join(map(repr, INPUTS))}, got {task!r}")
    return INPUTS[task]  # type: ignore[index]
