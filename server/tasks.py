"""The server's side of the task table: each critic's checkpoint, judges and image layout.

`clients.tasks` holds what a caller sees of a task (routes, wire messages, reward, weights); this
table adds what the server needs to score it: which judge fills each dimension, how a request's
images and text become judge calls, and the released checkpoint served by default. Adding a
critic means one entry here, one in `clients.tasks`, and its judges in `server.judges`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clients.protocol import (
    EditGroupRequest,
    EditScoreRequest,
    GenGroupRequest,
    GenScoreRequest,
    ScoringRequest,
    Task,
)
from clients.tasks import TASKS, TaskSpec
from server.judges import JUDGES, edit_fields, gen_fields


@dataclass(frozen=True)
class ItemInputs:
    """One scored item as the judges see it: its id, its images in prompt order as (request field,
    base64 data), and the template fields. Images with the same field name are decoded once."""

    id: str
    images: tuple[tuple[str, str], ...]
    fields: dict[str, str]


Layout = Callable[[ScoringRequest], list[ItemInputs]]


@dataclass(frozen=True)
class ServerTask:
    """One critic as the server serves it."""

    spec: TaskSpec
    checkpoint: str  # the released critic's hub id: the default model of the task
    judges: tuple[str, str]  # the judge of each of `spec.dimensions`, in the same order
    images_per_prompt: int
    text_field: str  # the request field holding the text the judges read (an instruction, a prompt)
    template_fields: Callable[[str, str | None], dict[str, str]]  # (text, requirement) -> the judges' fields
    score_layout: Layout  # items of the score route's request
    group_layout: Layout  # members of the group route's request
    # (input, output) positions in an item's images when the output is made from the input: an output
    # nearly identical to its input is an unchanged edit (`server.watch.looks`); None when nothing is edited
    unchanged_pair: tuple[int, int] | None = None

    @property
    def name(self) -> Task:
        return self.spec.name

    @property
    def max_new_tokens(self) -> int:
        """The release's answer budget of the task's judges (the larger, should they differ)."""
        return max(JUDGES[judge].max_new_tokens for judge in self.judges)

    def layout(self, request: ScoringRequest) -> list[ItemInputs]:
        is_group = isinstance(request, self.spec.group_request)
        return (self.group_layout if is_group else self.score_layout)(request)


def _item_id(given: str | None, index: int) -> str:
    return given if given is not None else str(index)


def _edit_items(request: ScoringRequest) -> list[ItemInputs]:
    assert isinstance(request, EditScoreRequest)
    return [
        ItemInputs(
            _item_id(item.id, i),
            ((f"items[{i}].source", item.source), (f"items[{i}].edited", item.edited)),
            edit_fields(item.instruction),
        )
        for i, item in enumerate(request.items)
    ]


def _edit_group(request: ScoringRequest) -> list[ItemInputs]:
    """The group's source travels once and is decoded once: every candidate names the same field."""
    assert isinstance(request, EditGroupRequest)
    fields = edit_fields(request.instruction)
    return [
        ItemInputs(str(i), (("source", request.source), (f"candidates[{i}]", candidate)), fields)
        for i, candidate in enumerate(request.candidates)
    ]


def _gen_items(request: ScoringRequest) -> list[ItemInputs]:
    assert isinstance(request, GenScoreRequest)
    return [
        ItemInputs(
            _item_id(item.id, i), ((f"items[{i}].image", item.image),), gen_fields(item.prompt, item.requirement)
        )
        for i, item in enumerate(request.items)
    ]


def _gen_group(request: ScoringRequest) -> list[ItemInputs]:
    assert isinstance(request, GenGroupRequest)
    fields = gen_fields(request.prompt, request.requirement)
    return [ItemInputs(str(i), ((f"images[{i}]", image),), fields) for i, image in enumerate(request.images)]


SERVER_TASKS: dict[Task, ServerTask] = {
    task.name: task
    for task in (
        ServerTask(
            spec=TASKS["edit"],
            checkpoint="VisionXLab/FIRM-Edit-8B",
            judges=("edit_execution", "edit_consistency"),
            images_per_prompt=2,
            text_field="instruction",
            template_fields=edit_fields,
            score_layout=_edit_items,
            group_layout=_edit_group,
            unchanged_pair=(0, 1),
        ),
        ServerTask(
            spec=TASKS["gen"],
            checkpoint="VisionXLab/FIRM-Gen-8B",
            judges=("gen_instruction_following", "gen_quality"),
            images_per_prompt=1,
            text_field="prompt",
            template_fields=gen_fields,
            score_layout=_gen_items,
            group_layout=_gen_group,
        ),
    )
}
