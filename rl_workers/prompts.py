"""Prompt files: what each worker samples groups for."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from rl_workers.generators.base import Condition
from rl_workers.tasks import rollout_task


def load_conditions(path: Path, task: str, rank: int = 0, world: int = 1) -> list[Condition]:
    """Rank `rank`'s share of the prompts (every `world`-th line; all of them when there are fewer lines
    than ranks), so each worker reads only its own source images.

    Each line is read as the task says (`rl_workers.tasks`): for text-to-image one prompt per line (or
    JSONL with "prompt"); for editing JSONL with "source" (an image path, relative to the file) and
    "instruction". Blank lines are skipped; an unreadable line names its number."""
    read_line = rollout_task(task).read_line
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    conditions = []
    for number, text in lines[rank::world] or lines:
        try:
            conditions.append(read_line(text, path.parent, f"{path.name}:{number}"))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
    if not conditions:
        raise ValueError(f"{path} holds no prompts")
    return conditions


def endless(conditions: list[Condition], seed: int) -> Iterator[Condition]:
    """The prompts over and over, reshuffled every pass."""
    rng = random.Random(seed)
    while True:
        order = list(conditions)
        rng.shuffle(order)
        yield from order
