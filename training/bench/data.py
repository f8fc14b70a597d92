"""A FIRM-Bench style folder: JSONL files of human-scored items next to their images.

Editing lines name the dimension they rate (execution or consistency) and carry the human
score; generation lines carry a difficulty (easy or hard) and the human instruction-following
score. Column names are configurable, image paths are relative to the image root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.manifest import ManifestError, read_manifest

EDIT_FIELDS = ("source", "edited", "instruction", "dimension", "human")
GEN_FIELDS = ("image", "prompt", "requirement", "difficulty", "human")
EDIT_GROUPS = ("execution", "consistency")
GEN_GROUPS = ("easy", "hard")


@dataclass(frozen=True)
class BenchItem:
    """One human judgement: `group` is execution/consistency (edit) or easy/hard (gen)."""

    id: str
    task: str
    group: str
    human: float
    images: tuple[Path, ...]
    text: str  # the instruction or the prompt
    requirement: str | None = None


def _human(value: object, where: str) -> float:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: the human score must be a number, got {value!r}") from None
    if not 1.0 <= score <= 5.0:
        raise ManifestError(f"{where}: the human score must lie in 1-5, got {score}")
    return score


def _group(value: object, allowed: tuple[str, ...], where: str) -> str:
    group = str(value).strip().lower()
    if group not in allowed:
        raise ManifestError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
    return group


def load_edit_items(path: Path, fields: dict[str, str], image_root: Path, id_field: str = "id") -> list[BenchItem]:
    items = []
    for row in read_manifest(path, fields, ("source", "edited", "instruction", "dimension", "human"), id_field):
        where = f"{path}:{row.line}"
        items.append(
            BenchItem(
                id=row.id,
                task="edit",
                group=_group(row.values["dimension"], EDIT_GROUPS, f"{where}: {fields['dimension']}"),
                human=_human(row.values["human"], where),
                images=(row.image("source", image_root), row.image("edited", image_root)),
                text=row.text("instruction") or "",
            )
        )
    return items


def load_gen_items(path: Path, fields: dict[str, str], image_root: Path, id_field: str = "id") -> list[BenchItem]:
    items = []
    for row in read_manifest(path, fields, ("image", "prompt", "difficulty", "human"), id_field):
        where = f"{path}:{row.line}"
        items.append(
            BenchItem(
                id=row.id,
                task="gen",
                group=_group(row.values["difficulty"], GEN_GROUPS, f"{where}: {fields['difficulty']}"),
                human=_human(row.values["human"], where),
                images=(row.image("image", image_root),),
                text=row.text("prompt") or "",
                requirement=row.text("requirement"),
            )
        )
    return items
