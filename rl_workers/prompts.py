"""Prompt files: what each worker samples groups for."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from rl_workers.generators.base import Condition


def load_conditions(path: Path, task: str) -> list[Condition]:
    """T2I: one prompt per line (or JSONL with "prompt"). Editing: JSONL with "source" (an image path,
    relative to the file) and "instruction". Blank lines are skipped; an unreadable line names its number."""
    conditions = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
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


def endless(conditions: list[Condition], rank: int, world: int, seed: int) -> Iterator[Condition]:
    """This rank's share of the prompts, reshuffled every pass."""
    share = conditions[rank::world] or conditions
    rng = random.Random(seed + rank)
    while True:
        order = list(share)
        rng.shuffle(order)
        yield from order
