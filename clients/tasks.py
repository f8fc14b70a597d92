"""The task table: one entry per critic, the single home of each task's facts on the wire.

A task is data, not a branch: its name, its routes, its wire messages, its reward's name and
default weights, and the result fields of its two dimensions (the primary one first, the one
that gates the reward). The server, the client, the trainer adapters and the RL workers all read
this table; none of them tests a task by its name. The server's side of a task (judges, image
layout) is `server.tasks`, keyed on the same names.

>>> TASKS["edit"].reward, TASKS["edit"].default_weights.w1
('CME', 0.6)
>>> TASKS["gen"].dimensions
('instruction_following', 'quality')
>>> TASKS["gen"].group_path
'/v1/gen/score_group'
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.protocol import (
    EditGroupRequest,
    EditGroupResponse,
    EditResult,
    EditScoreRequest,
    EditScoreResponse,
    GenGroupRequest,
    GenGroupResponse,
    GenResult,
    GenScoreRequest,
    GenScoreResponse,
    RewardWeights,
    ScoringRequest,
    ScoringResponse,
    Task,
)


@dataclass(frozen=True)
class TaskSpec:
    """What a caller needs to know of one critic's task."""

    name: Task
    title: str  # what the critic judges, in words
    reward: str  # the reward's name, as the paper writes it
    default_weights: RewardWeights  # the paper's w1, w2 of R = P * (w1 + w2 * S)
    dimensions: tuple[str, str]  # result fields: the primary (gating) dimension, then the secondary one
    score_request: type[ScoringRequest]
    score_response: type[ScoringResponse]
    group_request: type[ScoringRequest]
    group_response: type[ScoringResponse]
    result: type[EditResult] | type[GenResult]
    group_members: str  # the group request's list of images: one result per member

    @property
    def score_path(self) -> str:
        return f"/v1/{self.name}/score"

    @property
    def group_path(self) -> str:
        return f"/v1/{self.name}/score_group"

    @property
    def reward_term(self) -> str:
        """The name trainers give this reward beside its dimensions (flow_grpo's score_dict keys)."""
        return f"firm_{self.name}"


EDIT = TaskSpec(
    name="edit",
    title="image editing",
    reward="CME",
    default_weights=RewardWeights(w1=0.6, w2=0.4),
    dimensions=("execution", "consistency"),
    score_request=EditScoreRequest,
    score_response=EditScoreResponse,
    group_request=EditGroupRequest,
    group_response=EditGroupResponse,
    result=EditResult,
    group_members="candidates",
)

GEN = TaskSpec(
    name="gen",
    title="text-to-image generation",
    reward="QMA",
    default_weights=RewardWeights(w1=0.4, w2=0.6),
    dimensions=("instruction_following", "quality"),
    score_request=GenScoreRequest,
    score_response=GenScoreResponse,
    group_request=GenGroupRequest,
    group_response=GenGroupResponse,
    result=GenResult,
    group_members="images",
)

TASKS: dict[Task, TaskSpec] = {spec.name: spec for spec in (EDIT, GEN)}


def task_spec(name: str) -> TaskSpec:
    """The spec of a task by its name, with the known names in the error."""
    try:
        return TASKS[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}") from None


def task_of_path(path: str) -> TaskSpec | None:
    """The task a scoring route's path belongs to (`/v1/<task>/...`), None for any other path.

    >>> task_of_path("/v1/edit/score_group").name, task_of_path("/v1/models")
    ('edit', None)
    """
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] in TASKS:
        return TASKS[parts[2]]  # type: ignore[index]
    return None
