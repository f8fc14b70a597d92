"""MAE against human scores, in the paper's table layout, with the paper's figures for reference.

Overall figures are means over items (so the larger dimension weighs more, as in the paper).
Items the critic failed on are left out of every mean and counted in their own column.

    >>> mae([(5.0, 4.0), (1.0, 3.0)])
    1.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from training.bench.data import BenchItem
from training.bench.scoring import Prediction
from training.bench.splits import SPLITS

# (task, group, title) of each figure of the table, split by split; "overall" is every item of the split
COLUMNS = tuple((s.task, group, group.capitalize()) for s in SPLITS for group in (*s.groups, "overall"))
CELL = 13  # the width of a column of the table


def mae(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Mean absolute error of (predicted, human) pairs; None when there are none."""
    errors = [abs(p - h) for p, h in pairs]
    return sum(errors) / len(errors) if errors else None


def metrics(items: Sequence[BenchItem], predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """Per task and group (and overall): MAE, items scored, items failed."""
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        chosen = [(i, p) for i, p in zip(items, predictions, strict=True) if i.task == split.task]
        if not chosen:
            continue
        out[split.task] = {}
        for group in (*split.groups, "overall"):
            members = [(i, p) for i, p in chosen if group in ("overall", i.group)]
            scored = [(p.value, i.human) for i, p in members if p.value is not None]
            out[split.task][group] = {"mae": mae(scored), "scored": len(scored), "failed": len(members) - len(scored)}
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table(figures: dict[str, dict[str, Any]], label: str) -> str:
    """The paper's layout: a block per split (its groups, then overall), the paper's models above this one."""
    paper = {split.task: split.paper for split in SPLITS}
    rows: list[tuple[str, list[str]]] = []
    for name in dict.fromkeys(name for split in SPLITS for name in split.paper):
        rows.append((name, [_cell(paper[task].get(name, {}).get(group)) for task, group, _ in COLUMNS]))
    ours = [_cell(figures.get(task, {}).get(group, {}).get("mae")) for task, group, _ in COLUMNS]
    rows.append((label, ours))
    width = max(len(name) for name, _ in rows) + 2
    header1 = " " * width
    for n, split in enumerate(SPLITS):
        title = f"{split.title} (MAE, lower is better)" if n == 0 else f"{split.title} (MAE)"
        header1 += f"{title:<{(len(split.groups) + 1) * CELL}}"
    header2 = (f"{'Model':<{width}}" + "".join(f"{title:<{CELL}}" for _, _, title in COLUMNS)).rstrip()
    lines = [header1.rstrip(), header2, "-" * len(header2)]
    lines += [(f"{name:<{width}}" + "".join(f"{cell:<{CELL}}" for cell in cells)).rstrip() for name, cells in rows]
    counts = []
    for split in SPLITS:
        if split.task in figures:
            overall = figures[split.task]["overall"]
            counts.append(f"{split.task}: {overall['scored']} scored, {overall['failed']} failed")
    lines.append("items: " + "; ".join(counts) + " (failed items are left out of every MAE)")
    return "\n".join(lines)


def per_item(items: Sequence[BenchItem], predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    return [
        {
            "id": item.id,
            "task": item.task,
            "group": item.group,
            "human": item.human,
            "predicted": p.value,
            "written": p.written,
            "expected": p.expected,
            "abs_error": None if p.value is None else abs(p.value - item.human),
            "error": p.error,
            "reasoning": p.reasoning,
            "images": [str(path) for path in item.images],
            "text": item.text,
        }
        for item, p in zip(items, predictions, strict=True)
    ]
