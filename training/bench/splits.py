"""FIRM-Bench's splits, one per critic's task: the benchmark's own facts in one table.

A split names the columns of its JSONL file, the groups its figures are reported by, the paper's
figures, and how its items reach the critic. The loader, the scoring, the report and the plot
iterate this table; none of them tests a task by its name.

    >>> [(s.task, s.groups) for s in SPLITS]
    [('edit', ('execution', 'consistency')), ('gen', ('easy', 'hard'))]
    >>> SPLITS[1].columns
    ('image', 'prompt', 'requirement', 'difficulty', 'human')
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clients import AsyncRewardClient
from clients.protocol import ScoreMode, ScoringResponse, Task
from clients.tasks import EDIT, GEN

if TYPE_CHECKING:
    from training.bench.data import BenchItem

Request = Callable[[AsyncRewardClient, Sequence["BenchItem"], ScoreMode], Awaitable[ScoringResponse]]


@dataclass(frozen=True)
class Split:
    """One half of the benchmark: the human-rated items of one critic's task."""

    task: Task  # the critic it benchmarks
    title: str  # its name in the paper's table
    label: str  # its name in a panel's title
    noun: str  # what its items are, in the flags' help
    images: tuple[str, ...]  # the columns of an item's images, in the order the critic takes them
    text: str  # the column of the instruction or the prompt
    requirement: str | None  # an optional column of text the critic also reads
    group: str  # the column naming the group an item is reported in
    groups: tuple[str, ...]
    rated: str | None  # the result dimension compared with the human score; None: the item's group names it
    paper: dict[str, dict[str, float]]  # the paper's MAE by model, then group ("overall" too); absent: not given
    request: Request  # one request scoring the items, each with its reasoning

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the split's file may hold (the names --<task>-field renames)."""
        optional = (self.requirement,) if self.requirement else ()
        return (*self.images, self.text, *optional, self.group, "human")

    @property
    def required(self) -> tuple[str, ...]:
        return (*self.images, self.text, self.group, "human")

    def dimension(self, item: BenchItem) -> str:
        """The result field whose score is compared with the item's human score."""
        return self.rated or item.group


async def _edits(scorer: AsyncRewardClient, items: Sequence[BenchItem], mode: ScoreMode) -> ScoringResponse:
    sources, edited = [i.images[0] for i in items], [i.images[1] for i in items]
    instructions = [i.text for i in items]
    return await scorer.score_edits(sources, edited, instructions, score_mode=mode, return_reasoning=True)


async def _generations(scorer: AsyncRewardClient, items: Sequence[BenchItem], mode: ScoreMode) -> ScoringResponse:
    return await scorer.score_generations(
        [i.images[0] for i in items],
        [i.text for i in items],
        requirements=[i.requirement for i in items],
        score_mode=mode,
        return_reasoning=True,
    )


# FIRM-Bench MAE reported in the paper (arXiv 2603.12247).
SPLITS = (
    Split(
        task=EDIT.name,
        title="FIRM-Bench-Edit",
        label="Edit",
        noun="editing",
        images=("source", "edited"),
        text="instruction",
        requirement=None,
        group="dimension",
        groups=("execution", "consistency"),
        rated=None,
        paper={
            "GPT-5 (paper)": {"execution": 0.62, "consistency": 0.73, "overall": 0.67},
            "FIRM-8B (paper)": {"execution": 0.53, "consistency": 0.73, "overall": 0.62},
        },
        request=_edits,
    ),
    Split(
        task=GEN.name,
        title="FIRM-Bench-Gen",
        label="Gen",
        noun="generation",
        images=("image",),
        text="prompt",
        requirement="requirement",
        group="difficulty",
        groups=("easy", "hard"),
        rated=GEN.dimensions[0],  # humans rated instruction following, the primary dimension
        paper={"GPT-5 (paper)": {"overall": 0.52}, "FIRM-8B (paper)": {"easy": 0.45, "hard": 0.57, "overall": 0.51}},
        request=_generations,
    ),
)
