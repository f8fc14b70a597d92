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

COLUMNS = (
    ("edit", "execution", "Execution"),
    ("edit", "consistency", "Consistency"),
    ("edit", "overall", "Overall"),
    ("gen", "easy", "Easy"),
    ("gen", "hard", "Hard"),
    ("gen", "overall", "Overall"),
)
# FIRM-Bench MAE reported in the paper (arXiv 2603.12247); None where it gives no figure.
PAPER = {
    "GPT-5 (paper)": {"edit": {"execution": 0.62, "consistency": 0.73, "overall": 0.67}, "gen": {"overall": 0.52}},
    "FIRM-8B (paper)": {
        "edit": {"execution": 0.53, "consistency": 0.73, "overall": 0.62},
        "gen": {"easy": 0.45, "hard": 0.57, "overall": 0.51},
    },
}


def mae(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Mean absolute error of (predicted, human) pairs; None when there are none."""
    errors = [abs(p - h) for p, h in pairs]
    return sum(errors) / len(errors) if errors else None


def metrics(items: Sequence[BenchItem], predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """Per task and group (and overall): MAE, items scored, items failed."""
    out: dict[str, dict[str, Any]] = {}
    for task, groups in (("edit", ("execution", "consistency")), ("gen", ("easy", "hard"))):
        chosen = [(i, p) for i, p in zip(items, predictions, strict=True) if i.task == task]
        if not chosen:
            continue
        out[task] = {}
        for group in (*groups, "overall"):
            members = [(i, p) for i, p in chosen if group in ("overall", i.group)]
            scored = [(p.value, i.human) for i, p in members if p.value is not None]
            out[task][group] = {"mae": mae(scored), "scored": len(scored), "failed": len(members) - len(scored)}
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table(figures: dict[str, dict[str, Any]], label: str) -> str:
    """The paper's layout: editing execution / consistency / overall, generation easy / hard / overall."""
    rows: list[tuple[str, list[str]]] = []
    for name, paper in PAPER.items():
        rows.append((name, [_cell(paper.get(task, {}).get(group)) for task, group, _ in COLUMNS]))
    ours = [_cell(figures.get(task, {}).get(group, {}).get("mae")) for task, group, _ in COLUMNS]
    rows.append((label, ours))
    width = max(len(name) for name, _ in rows) + 2
    header1 = " " * width + f"{'FIRM-Bench-Edit (MAE, lower is better)':<{3 * 13}}" + "FIRM-Bench-Gen (MAE)"
    header2 = (f"{'Model':<{width}}" + "".join(f"{title:<13}" for _, _, title in COLUMNS)).rstrip()
    lines = [header1, header2, "-" * len(header2)]
    lines += [(f"{name:<{width}}" + "".join(f"{cell:<13}" for cell in cells)).rstrip() for name, cells in rows]
    counts = []
    for task in ("edit", "gen"):
        if task in figures:
            overall = figures[task]["overall"]
            counts.append(f"{task}: {overall['scored']} scored, {overall['failed']} failed")
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
