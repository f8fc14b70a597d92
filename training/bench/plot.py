"""Predicted-vs-human confusion matrices as a PNG, drawn with Pillow alone.

One 5x5 panel per benchmark group: rows are the human score (rounded), columns the score the
critic wrote; each cell shows its count, shaded by its share of the row. Failed items are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.bench.data import BenchItem
from training.bench.scoring import Prediction
from training.bench.splits import SPLITS

CELL, MARGIN, TITLE = 44, 48, 28
# (task, group, title) of each panel, split by split
PANELS = tuple((s.task, group, f"{s.label}: {group}") for s in SPLITS for group in s.groups)


def confusion(items: Sequence[BenchItem], predictions: Sequence[Prediction], task: str, group: str) -> list[list[int]]:
    """counts[human - 1][written - 1] over the scored items of one group (a failed item, even one with a
    written score but no value in the chosen score mode, is left out, as it is from the MAE)."""
    counts = [[0] * 5 for _ in range(5)]
    for item, prediction in zip(items, predictions, strict=True):
        if (
            item.task == task
            and item.group == group
            and prediction.written is not None
            and prediction.value is not None
        ):
            human = min(5, max(1, int(item.human + 0.5)))
            counts[human - 1][prediction.written - 1] += 1
    return counts


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, counts: list[list[int]]) -> None:
    font = ImageFont.load_default()
    x0, y0 = origin
    draw.text((x0, y0), title, fill="black", font=font)
    top, left = y0 + TITLE, x0 + MARGIN
    for r in range(5):
        total = sum(counts[r]) or 1
        draw.text((x0 + 18, top + r * CELL + CELL // 2 - 6), str(r + 1), fill="black", font=font)
        for c in range(5):
            share = counts[r][c] / total
            shade = int(255 - 200 * share)
            box = (left + c * CELL, top + r * CELL, left + (c + 1) * CELL, top + (r + 1) * CELL)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            draw.text(
                (box[0] + CELL // 2 - 6, box[1] + CELL // 2 - 6),
                str(counts[r][c]),
                fill="white" if share > 0.6 else "black",
                font=font,
            )
    for c in range(5):
        draw.text((left + c * CELL + CELL // 2 - 3, top + 5 * CELL + 4), str(c + 1), fill="black", font=font)
    draw.text((left, top + 5 * CELL + 20), "predicted (rows: human)", fill="black", font=font)


Matrices = dict[str, dict[str, list[list[int]]]]  # task -> group -> counts[human - 1][written - 1]


def confusion_matrices(items: Sequence[BenchItem], predictions: Sequence[Prediction]) -> Matrices:
    """The count matrix of every benchmark group that has items, as results.json keeps them."""
    matrices: Matrices = {}
    for task, group, _ in PANELS:
        if any(i.task == task and i.group == group for i in items):
            matrices.setdefault(task, {})[group] = confusion(items, predictions, task, group)
    return matrices


def draw_confusions(matrices: Matrices, path: Path) -> list[str]:
    """Write the PNG, a panel per matrix; returns the titles of the panels drawn."""
    panels = [(t, g, title) for t, g, title in PANELS if g in matrices.get(t, {})]
    width = MARGIN + 5 * CELL + 24
    height = TITLE + 5 * CELL + 44
    image = Image.new("RGB", (max(1, len(panels)) * width + 16, height + 16), "white")
    draw = ImageDraw.Draw(image)
    for n, (task, group, title) in enumerate(panels):
        _panel(draw, (8 + n * width, 8), title, matrices[task][group])
    image.save(path, format="PNG")
    return [title for _, _, title in panels]
