"""A FIRM-Bench style folder: a JSONL file of human-scored items per split, next to their images.

Each line carries the item's images and text, the group it is reported in (for the editing split
the dimension it rates, for the generation split its difficulty) and the human score. The columns
are each split's (`training.bench.splits`); their names are configurable, image paths are
relative to the image root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.bench.splits import Split
from training.manifest import ManifestError, read_manifest


@dataclass(frozen=True)
class BenchItem:
    """One human judgement: `group` is one of its split's groups (execution, easy, ...)."""

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


def load_split(
    split: Split, path: Path, fields: dict[str, str], image_root: Path, id_field: str = "id"
) -> list[BenchItem]:
    """The items of one split's file; `fields` maps the split's columns to the file's."""
    items = []
    for row in read_manifest(path, fields, split.required, id_field):
        where = f"{path}:{row.line}"
        items.append(
            BenchItem(
                id=row.id,
                task=split.task,
                group=_group(row.values[split.group], split.groups, f"{where}: {fields[split.group]}"),
                human=_human(row.values["human"], where),
                images=tuple(row.image(column, image_root) for column in split.images),
                text=row.text(split.text) or "",
                requirement=row.text(split.requirement) if split.requirement else None,
            )
        )
    return items
