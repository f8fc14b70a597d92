"""Canaries: a small calibration set scored again and again, so a judge that drifts is caught.

Decoding is greedy, so a critic asked the same thing must answer the same. The set (synthetic
images drawn here, plus optionally a user's own items with expected scores) is scored at start,
every `--canary-every` seconds and after every wake. The first answers become the reference unless
`--canary-reference` names a file of them. An answer whose score differs from the reference, or
whose expected value is more than `--canary-tolerance` away, is drift: the task's model turns
`degraded`, `firm_canary_drift` counts the differing items, and the log and the watch page say
which. A clean run clears it.

The calls bypass the judge-answer cache (a cached answer would repeat whatever the engine does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from clients.protocol import Task
from server.judge_cache import CallSharing
from server.judging import Judging, Prepared
from server.lifecycle import Lifecycle, ModelState, TaskModel
from server.metrics import Metrics
from server.results import Judged, dimension
from server.tasks import ServerTask

log = logging.getLogger(__name__)

SIDE = 256
Answer = dict[str, Any]  # dimension -> {"score", "expected"}, or {"error": code}


@dataclass(frozen=True)
class CanaryItem:
    id: str
    task: Task
    images: tuple[Image.Image, ...]
    text: str
    expected: dict[str, int] | None = None  # a user's item: the scores it must get


def _canvas(colour: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIDE, SIDE), colour)
    return image, ImageDraw.Draw(image)


def _disc(fill: tuple[int, int, int]) -> Image.Image:
    image, draw = _canvas((170, 205, 240))
    draw.ellipse((64, 64, 192, 192), fill=fill)
    return image


def _square(fill: tuple[int, int, int]) -> Image.Image:
    image, draw = _canvas((200, 200, 200))
    draw.rectangle((72, 72, 184, 184), fill=fill)
    return image


def _stripe() -> Image.Image:
    image, draw = _canvas((250, 250, 250))
    draw.rectangle((0, 112, SIDE, 144), fill=(20, 20, 20))
    return image


# (id, edit instruction, description of the output, input image, output image)
SCENES: tuple[tuple[str, str, str, Callable[[], Image.Image], Callable[[], Image.Image]], ...] = (
    (
        "recolour",
        "Make the disc green.",
        "A green disc on a light blue background.",
        lambda: _disc((210, 40, 40)),
        lambda: _disc((40, 170, 70)),
    ),
    (
        "unchanged",
        "Turn the square into a circle.",
        "A yellow circle on a grey background.",
        lambda: _square((235, 210, 40)),
        lambda: _square((235, 210, 40)),
    ),
    (
        "stripe",
        "Add a black horizontal stripe across the middle.",
        "A white picture with a black horizontal stripe across the middle.",
        lambda: _canvas((250, 250, 250))[0],
        _stripe,
    ),
)


def synthetic_items(task: ServerTask) -> list[CanaryItem]:
    """The project's own canaries for `task`: an edit task sees input and output with the instruction,
    a task of one image sees the output with its description."""
    items = []
    for name, instruction, description, before, after in SCENES:
        edits = task.unchanged_pair is not None
        images = (before(), after())[-task.images_per_prompt :]
        items.append(CanaryItem(f"synthetic-{name}", task.name, images, instruction if edits else description))
    return items


def user_items(manifest: Path, tasks: Sequence[Task]) -> list[CanaryItem]:
    """A user's canaries from a JSON file: {"items": [{"task", "id", "images": [paths], "text", "scores":
    {dimension: 1-5}}]}, image paths relative to the file. Items of a task not served are left out."""
    data = json.loads(manifest.read_text(encoding="utf-8"))
    items = []
    for entry in data["items"]:
        if entry["task"] not in tasks:
            continue
        images = tuple(Image.open(manifest.parent / path).convert("RGB") for path in entry["images"])
        scores = {name: int(value) for name, value in entry.get("scores", {}).items()}
        items.append(CanaryItem(f"user-{entry['id']}", entry["task"], images, entry["text"], scores or None))
    return items


# item error codes of a call the engine did not answer, unlike an answer that did not parse (which is drift);
# canary runs set no deadline, so "deadline" only guards against one being added
UNANSWERED = frozenset({"engine_error", "deadline"})


def answer_of(task: ServerTask, judged: Judged) -> Answer:
    if judged.error is not None:
        return {"error": judged.error.code}
    answer: Answer = {}
    for name, judge in zip(task.spec.dimensions, task.judges, strict=True):
        view, _ = dimension(judged.outcomes.get(judge), "argmax", reasoning=False)
        answer[name] = None if view is None else {"score": view.score, "expected": view.expected}
    return answer


def differences(answer: Answer, reference: Answer, tolerance: float) -> list[str]:
    """How `answer` departs from `reference`: each score that differs, each expected value further than
    `tolerance`; a reference without expected values checks the scores alone.

    >>> differences({"a": {"score": 4, "expected": 3.9}}, {"a": {"score": 4, "expected": 3.95}}, 0.1)
    []
    >>> differences({"a": {"score": 3, "expected": 3.2}}, {"a": {"score": 4, "expected": 3.9}}, 0.1)
    ['a: score 3, reference 4', 'a: expected 3.200, reference 3.900']
    """
    if "error" in answer or "error" in reference:
        return [] if answer.get("error") == reference.get("error") else [f"answer {answer}, reference {reference}"]
    found = []
    for name, ref in reference.items():
        got = answer.get(name)
        if ref is None or got is None:
            if ref != got:
                found.append(f"{name}: {got}, reference {ref}")
            continue
        if got["score"] != ref["score"]:
            found.append(f"{name}: score {got['score']}, reference {ref['score']}")
        ref_expected, got_expected = ref.get("expected"), got.get("expected")
        if ref_expected is None:
            continue
        if got_expected is None or abs(got_expected - ref_expected) > tolerance:
            shown = "none" if got_expected is None else f"{got_expected:.3f}"
            found.append(f"{name}: expected {shown}, reference {ref_expected:.3f}")
    return found


class Canaries:
    """Scores the calibration set of every served task and keeps each task's verdict."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: Metrics,
        *,
        tolerance: float,
        reference: Path | None = None,
        user_set: Path | None = None,
        structured_outputs: bool = False,
    ) -> None:
        self.lifecycle, self.metrics, self.tolerance = lifecycle, metrics, tolerance
        tasks = list(lifecycle.models)
        self.items = {t: synthetic_items(m.task) for t, m in lifecycle.models.items()}
        for item in user_items(user_set, tasks) if user_set else []:
            self.items[item.task].append(item)
        self.reference: dict[str, dict[str, Answer]] = {}
        if reference is not None:
            self.reference = json.loads(reference.read_text(encoding="utf-8"))
        self.reference_origin = str(reference) if reference else "first run"
        for task in self.items:
            for item in self.items[task]:
                if item.expected is not None:
                    self.reference.setdefault(task, {})[item.id] = {
                        name: {"score": score} for name, score in item.expected.items()
                    }
        self.report: dict[str, dict[str, Any]] = {task: {"status": "pending"} for task in self.items}
        # judging of its own: no cache, and figures on a registry no one scrapes (canaries are not traffic);
        # asked as traffic asks, so a canary tests the decoding path that traffic uses
        self.judging = Judging(Metrics(), CallSharing(0), structured_outputs=structured_outputs)
        self._lock = asyncio.Lock()
        self.runs = 0

    async def run(self, reason: str) -> None:
        """Score the set of every task whose model can score now; a task asleep or loading is skipped. A run
        that breaks is logged and counted as failed for every task, never raised: canaries are not traffic."""
        try:
            await self._run(reason)
        except Exception:
            log.exception("canary run after %s failed", reason)
            for task in self.items:
                self.metrics.canary_runs.labels(task=task, outcome="failed").inc()

    async def _run(self, reason: str) -> None:
        async with self._lock:
            for task, model in self.lifecycle.models.items():
                if model.state == ModelState.READY:
                    await self._run_task(task, model, reason)
            self.runs += 1

    async def _run_task(self, task: Task, model: TaskModel, reason: str) -> None:
        items = self.items[task]
        prepared = [Prepared(item.images, model.task.template_fields(item.text, None)) for item in items]
        judged = await self.judging.judge(model, prepared)
        answers = {item.id: answer_of(model.task, j) for item, j in zip(items, judged, strict=True)}
        reference = self.reference.setdefault(task, {})
        for item_id, answer in answers.items():
            if "error" not in answer:  # the first answers are the reference; a failed call is no reference
                reference.setdefault(item_id, answer)
        # a call the engine did not answer says nothing of the critic's answers: it is no drift
        unanswered = {i for i, a in answers.items() if a.get("error") in UNANSWERED}
        compared = [i for i in answers if i not in unanswered and i in reference]
        drift = {i: d for i in compared if (d := differences(answers[i], reference[i], self.tolerance))}
        failed = not compared  # nothing answered, or nothing yet to compare an answer with
        outcome = "failed" if failed else "drift" if drift else "clean"
        self.metrics.canary_runs.labels(task=task, outcome=outcome).inc()
        if failed:  # the engine failed, or went to sleep mid-run, or no reference yet: the state stays as it was
            log.warning("canary run of %s after %s failed: no answer to compare with a reference", task, reason)
        else:
            if unanswered:
                log.warning(
                    "canary run of %s after %s: %d of %d items unanswered (%s), compared on the rest",
                    task, reason, len(unanswered), len(answers), ", ".join(sorted(unanswered)),
                )  # fmt: skip
            self.metrics.canary_drift.labels(task=task).set(len(drift))
            self.lifecycle.set_degraded(task, bool(drift))
        for item_id, found in drift.items():
            log.warning("canary drift: %s item %s after %s: %s", task, item_id, reason, "; ".join(found))
        if not drift and self.report[task].get("status") == "drift":
            log.info("canary: %s answers match the reference again after %s", task, reason)
        self.report[task] = {
            "status": outcome,
            "reason": reason,
            "time": time.time(),
            "items": len(items),
            "unanswered": sorted(unanswered),
            "differences": drift,
            "answers": answers,
        }

    def view(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "reference_origin": self.reference_origin,
            "runs": self.runs,
            "tasks": self.report,
            "reference": self.reference,
        }

    async def every(self, seconds: float) -> None:
        """Run the set every `seconds` until cancelled; a failed run is logged and counted, and the next one
        still comes."""
        while True:
            await asyncio.sleep(seconds)
            await self.run("schedule")
