"""The watch: every scored item's hacking signals, counted in the metrics and kept for the page.

`observe` runs on the event loop after each scoring request, on what the request already made: the
results, and the `Looks` the decoding thread made of its images. It only adds to counters and, when
the ring is on, appends one sample per item it can hold (a request's last `size` items). The windows'
gauges are read from the windows when a scrape collects them, so they hold as of the scrape, traffic or none.

The signals:
- an unchanged edit: the output is within `UNCHANGED_DISTANCE` of its input (`server.watch.looks`);
  one whose primary score is `FOOLED_SCORE` or more is flagged, a judge fooled;
- saturation: the share of maximum scores per dimension, in the last window and the baseline;
- disagreement: the mean |score - expected| per dimension, which rises as the judge grows less sure.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from clients.protocol import DimensionScore, ScoringResponse, Task
from server.metrics import Metrics
from server.results import Judged
from server.tasks import ItemInputs, ServerTask
from server.watch.looks import UNCHANGED_DISTANCE, LookMaker, Looks
from server.watch.ring import MAX_REASONING_CHARS, MAX_TEXT_CHARS, Sample, SampleRing, clipped
from server.watch.windows import MAX_SCORE, Tally, Windows

FOOLED_SCORE = 4  # an unchanged edit scored this high on its primary dimension is flagged
LOW_SCORE = 2  # an item whose weakest dimension is at most this is listed under "low"
HIGH_SCORE = 4  # an item whose weakest dimension is at least this is listed under "high"


def _dimensions(result: Any, names: Sequence[str]) -> dict[str, DimensionScore | None]:
    return {name: getattr(result, name) for name in names}


def _tags(dims: Mapping[str, DimensionScore | None], error: str | None, flagged: bool) -> tuple[str, ...]:
    scores = [d.score for d in dims.values() if d is not None and d.score is not None]
    tags = []
    if scores and min(scores) <= LOW_SCORE:
        tags.append("low")
    if scores and min(scores) >= HIGH_SCORE:
        tags.append("high")
    if error is not None:
        tags.append("failed")
    if flagged:
        tags.append("flagged")
    return tuple(tags)


class Watch:
    def __init__(
        self,
        tasks: Sequence[ServerTask],
        metrics: Metrics,
        *,
        samples: int,
        window_s: float,
        baseline_s: float,
        clock: Any = time.time,
    ) -> None:
        self.metrics, self.clock = metrics, clock
        self.started = clock()
        self.ring = SampleRing(samples)
        self.looks = LookMaker(thumbnails=self.ring.enabled)
        self.tasks = {task.name: task for task in tasks}
        self.windows = {
            task.name: Windows(task.spec.dimensions, started=self.started, window_s=window_s, baseline_s=baseline_s)
            for task in tasks
        }
        self._gauges()

    def _gauges(self) -> None:
        """Each window's saturation and disagreement gauges, read from the windows as a scrape collects them."""
        figures = ((self.metrics.max_score_share, "max_share"), (self.metrics.score_disagreement, "disagreement"))
        for name, windows in self.windows.items():
            for dimension in windows.dimensions:
                for which in ("last", "baseline"):
                    labels = {"task": name, "dimension": dimension, "window": which}
                    for gauge, figure in figures:
                        read = functools.partial(self._figure, windows, dimension, which, figure)
                        gauge.labels(**labels).set_function(read)

    def look(self, task: ServerTask, images: Sequence[Any]) -> list[Looks]:
        """Looks of each item (its decoded images, or None for an item that failed to decode); for the
        decoding thread. Only the last items, those the ring can hold, get thumbnails."""
        seen: dict[Any, Any] = {}
        return [
            Looks()
            if item is None
            else self.looks.make(item, task.unchanged_pair, seen, kept=self.ring.keeps(index, len(images)))
            for index, item in enumerate(images)
        ]

    def observe(
        self,
        task: ServerTask,
        inputs: Sequence[ItemInputs],
        looks: Sequence[Looks],
        judged: Sequence[Judged],
        response: ScoringResponse,
    ) -> None:
        """Count one answered request's items (and its group, for a group request). The reasoning is read
        from the verdicts, so the response carries it only when its caller asked."""
        now = self.clock()
        windows = self.windows[task.name]
        tallies = [windows.bucket(now)]
        if windows.in_baseline(now):
            tallies.append(windows.baseline)
        results = response.results  # type: ignore[attr-defined]
        for index, (item, look, verdicts, result) in enumerate(zip(inputs, looks, judged, results, strict=True)):
            self._item(task, item, look, result, tallies, now, verdicts, kept=self.ring.keeps(index, len(results)))
        group = getattr(response, "group", None)
        if group is not None:
            zero = group.scored >= 2 and group.std == 0
            for tally in tallies:
                tally.groups += 1
                tally.zero_spread += zero
            if zero:
                self.metrics.zero_spread_groups.labels(task=task.name).inc()

    def _item(
        self,
        task: ServerTask,
        item: ItemInputs,
        look: Looks,
        result: Any,
        tallies: list[Tally],
        now: float,
        verdicts: Judged,
        *,
        kept: bool,
    ) -> None:
        spec = task.spec
        dims = _dimensions(result, spec.dimensions)
        error = result.error.code if result.error is not None else None
        primary = dims[spec.dimensions[0]]
        flagged = look.unchanged and primary is not None and (primary.score or 0) >= FOOLED_SCORE
        for tally in tallies:
            tally.items += 1
            tally.failures += error is not None
            tally.parse_failures += error == "parse_error"
            tally.engine_errors += error == "engine_error"
            tally.unchanged += look.unchanged
            tally.flagged += flagged
            if result.reward is not None:
                tally.add_reward(result.reward)
            for name, dim in dims.items():
                if dim is not None and dim.score is not None:
                    tally.dimensions[name].add(dim.score, dim.expected)
        if look.unchanged:
            self.metrics.unchanged_items.labels(task=task.name).inc()
        if flagged:
            self.metrics.fooled_items.labels(task=task.name).inc()
        if kept:
            self.ring.add(self._sample(task, item, result, dims, verdicts, now, look, flagged, error))

    def _sample(
        self,
        task: ServerTask,
        item: ItemInputs,
        result: Any,
        dims: Mapping[str, DimensionScore | None],
        verdicts: Judged,
        now: float,
        look: Looks,
        flagged: bool,
        error: str | None,
    ) -> Sample:
        """What the page shows of one item: its text, thumbnails, scores with their reasoning, and signals."""
        reasons = {
            name: outcome.reasoning
            for name, judge in zip(task.spec.dimensions, task.judges, strict=True)
            if (outcome := verdicts.outcomes.get(judge)) is not None
        }
        return Sample(
            seq=self.ring.next_seq(),
            time=now,
            task=task.name,
            item=item.id,
            text=clipped(item.fields.get(task.text_field, ""), MAX_TEXT_CHARS) or "",
            thumbnails=look.thumbnails,
            scores={
                name: {
                    "score": dim.score,
                    "expected": dim.expected,
                    "reasoning": clipped(reasons.get(name), MAX_REASONING_CHARS),
                }
                for name, dim in dims.items()
                if dim is not None
            },
            reward=result.reward,
            error=None if result.error is None else f"{result.error.code}: {result.error.message}",
            distance=look.distance,
            unchanged=look.unchanged,
            flagged=flagged,
            tags=_tags(dims, error, flagged),
        )

    def _figure(self, windows: Windows, dimension: str, which: str, figure: str) -> float:
        """A window's figure for one dimension as of now, for its gauge; NaN while the window holds no
        score, not the last value it had while traffic flowed. Collected on the event loop only (the
        /metrics route, the Ray replica's push), where the windows are also written: they have no lock."""
        tally = windows.window(self.clock()) if which == "last" else windows.baseline
        value = tally.dimensions[dimension].view()[figure]
        return math.nan if value is None else value

    def pin_baseline(self) -> None:
        now = self.clock()
        for windows in self.windows.values():
            windows.pin(now)

    def view(self, *, limit: int | None = None, tag: str | None = None) -> dict[str, Any]:
        """The page's data: each task's windows and timeline, and the recent samples (newest first)."""
        now = self.clock()
        tasks: dict[Task, Any] = {}
        for name, windows in self.windows.items():
            tasks[name] = {
                "title": self.tasks[name].spec.title,
                "reward": self.tasks[name].spec.reward,
                "dimensions": list(windows.dimensions),
                "edits": self.tasks[name].unchanged_pair is not None,
                **windows.view(now),
            }
        return {
            "now": now,
            "started": self.started,
            "window_s": next(iter(self.windows.values())).window_s if self.windows else None,
            "max_score": MAX_SCORE,
            "unchanged_distance": UNCHANGED_DISTANCE,
            "fooled_score": FOOLED_SCORE,
            "ring": {"size": self.ring.size, "held": len(self.ring)},
            "tasks": tasks,
            "samples": [s.view() for s in self.ring.latest(limit, tag)],
        }
