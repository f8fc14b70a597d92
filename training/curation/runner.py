"""Run a pipeline over a manifest: a pool of workers, the record store, a progress bar, a summary.

Items already in the output are skipped. An item that fails (a teacher call that kept failing, a
reply without what was asked, a missing image) is counted and reported with its reason, and
left out of the output, so the next run tries it again. Nothing is written as a made-up score.
Any other exception is a bug: it stops the run, and the summary still says what was done and why
the run stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.curation.chat import ChatError
from training.curation.common import BadImage, Pipeline
from training.curation.replies import ReplyError
from training.curation.store import RecordStore
from training.manifest import ManifestError, Row
from training.records import AnswerMismatch

log = logging.getLogger(__name__)

# What fails one item and leaves the others running; anything else stops the run.
ITEM_ERRORS = (ChatError, ReplyError, AnswerMismatch, ManifestError, BadImage, OSError)
MAX_LISTED_FAILURES = 200


@dataclass
class RunReport:
    """What one run did; `summary()` adds what the output holds now."""

    task: str
    input_items: int
    skipped: int = 0
    written: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    aborted: str | None = None  # why the run stopped before every item was tried
    written_summary: dict[str, Any] = field(default_factory=dict)  # what went into the summary file

    def summary(self, pipeline: Pipeline, store: RecordStore) -> dict[str, Any]:
        histograms: dict[str, Counter[int]] = {name: Counter() for name in pipeline.judges}
        items: set[str] = set()
        for record in store.records():
            items.add(record["item_id"])
            histograms.setdefault(record["judge"], Counter())[int(record["score"])] += 1
        tokens = {step: client.usage.as_dict() for step, client in pipeline.clients().items()}
        total = sum(t["total_tokens"] for t in tokens.values())
        return {
            "task": self.task,
            "output": str(store.path),
            "items": {
                "in_input": self.input_items,
                "in_output": len(items),
                "skipped_as_done": self.skipped,
                "written_this_run": self.written,
                "failed_this_run": len(self.failures),
            },
            "failures": self.failures[:MAX_LISTED_FAILURES],
            "score_histogram": {
                judge: {str(s): hist.get(s, 0) for s in range(1, 6)} for judge, hist in histograms.items()
            },
            "tokens": {"by_step": tokens, "total": total},
            "repaired_lines": store.repaired,
            "seconds": round(self.seconds, 3),
            "aborted": self.aborted,
        }


async def _work(
    pipeline: Pipeline, queue: asyncio.Queue[Row | None], store: RecordStore, report: RunReport, bar: tqdm
) -> None:
    while (row := await queue.get()) is not None:
        try:
            records = await pipeline.curate(row)
        except ITEM_ERRORS as exc:
            report.failures.append({"id": row.id, "line": row.line, "error": f"{type(exc).__name__}: {exc}"})
            log.warning("item %s (line %d) failed: %s", row.id, row.line, exc)
        else:
            store.add(row.id, records)
            report.written += 1
        bar.update(1)
        bar.set_postfix(errors=len(report.failures), refresh=False)


async def run_pipeline(
    pipeline: Pipeline,
    rows: Sequence[Row],
    store: RecordStore,
    summary_path: Path,
    *,
    workers: int,
    progress: bool = True,
) -> RunReport:
    """Curate every row not yet in `store`, `workers` items at a time; the summary is written however it ends."""
    started = time.monotonic()
    report = RunReport(task=pipeline.task, input_items=len(rows))
    todo = [row for row in rows if row.id not in store.done]
    report.skipped = len(rows) - len(todo)
    queue: asyncio.Queue[Row | None] = asyncio.Queue()
    for row in todo:
        queue.put_nowait(row)
    count = max(1, min(workers, len(todo)))
    for _ in range(count):
        queue.put_nowait(None)
    try:
        with tqdm(total=len(todo), desc=f"curate {pipeline.task}", unit="item", disable=not progress) as bar:
            bar.set_postfix(errors=0)
            await _run_workers(count, lambda: _work(pipeline, queue, store, report, bar))
    except BaseException as exc:
        report.aborted = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for client in pipeline.clients().values():
            await client.aclose()
        report.seconds = time.monotonic() - started
        report.written_summary = report.summary(pipeline, store)
        write_summary(summary_path, report.written_summary)
    return report


async def _run_workers(count: int, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `count` workers; the first unexpected exception cancels the others and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        if len(failed.exceptions) == 1:
            raise failed.exceptions[0] from None
        raise


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write the summary JSON atomically (a reader never sees half of it)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    staging.replace(path)
