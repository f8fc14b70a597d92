"""Prompt files: what each worker samples groups for."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from rl_workers.generators.base import Condition


def load_conditions(path: Path, task: str, rank: int = 0, world: int = 1) -> list[Condition]:
    """Rank `rank`'s share of the prompts (every `world`-th line; all of them when there are fewer lines
    than ranks), so each worker reads only its own source images.

    T2I: one prompt per line (or JSONL with "prompt"). Editing: JSONL with "source" (an image path,
    relative to the file) and "instruction". Blank lines are skipped; an unreadable line names its number."""
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    conditions = []
    for number, text in lines[rank::world] or lines:
        try:
            conditions.append(_condition(text, task, path.parent, f"{path.name}:{number}"))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
    if not conditions:
        raise ValueError(f"{path} holds no prompts")
    return conditions


def _condition(text: str, task: str, root: Path, default_id: str) -> Condition:
    if task == "t2i":
        if text.startswith("{"):
            record = json.loads(text)
            return Condition(prompt=record["prompt"], id=str(record.get("id", default_id)))
        return Condition(prompt=text, id=default_id)
    record = json.loads(text)
    source = Path(record["source"])
    with Image.open(source if source.is_absolute() else root / source) as image:
        image.load()
        return Condition(
            prompt=record["instruction"], source=image.convert("RGB"), id=str(record.get("id", default_id))
        )


def endless(conditions: list[Condition], seed: int) -> Iterator[Condition]:
    """The prompts over and over, reshuffled every pass."""
    rng = random.Random(seed)
    while True:
        order = list(conditions)
        rng.shuffle(order)
        yield from order
