"""Judging: prepared items -> one engine call per judge -> parsed verdicts, failures kept per item.

Every judge call of a request (both dimensions of every item, every member of a group) is handed
to the runner at once so they can share a batch; identical calls share one engine call. An engine
error or an unparsable answer becomes that item's error, counted, never a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from clients.protocol import ItemError
from server.engines.base import GenerationRequest, GenerationResult
from server.judge_cache import CallSharing, DeadlineMissed, call_key
from server.judges import Judge, ParseError
from server.lifecycle import TaskModel
from server.metrics import Metrics
from server.results import Judged


@dataclass(frozen=True)
class Prepared:
    """An item ready for judging: its images in prompt order and the template fields."""

    images: tuple[Image.Image, ...]
    fields: dict[str, str]


@dataclass(frozen=True)
class _Call:
    item: int
    judge: Judge


class Judging:
    def __init__(self, metrics: Metrics, sharing: CallSharing, *, structured_outputs: bool = False) -> None:
        self.metrics, self.sharing, self.structured_outputs = metrics, sharing, structured_outputs

    async def judge(
        self, model: TaskModel, items: Sequence[Prepared | ItemError], deadline: float | None = None
    ) -> list[Judged]:
        """Each item's verdicts, or its error: the item's own (an undecodable image), its judges', or the
        caller's `deadline` (on the event loop's clock) passing first."""
        calls: list[_Call] = []
        requests: list[GenerationRequest] = []
        keys: list[str] = []
        digests: dict[int, str] = {}
        for index, item in enumerate(items):
            if not isinstance(item, Prepared):
                continue
            for judge in model.judges:
                calls.append(_Call(index, judge))
                parts = judge.prompt(item.images, **item.fields)
                constraint = judge.spec.constraint if self.structured_outputs else None
                requests.append(GenerationRequest(parts, judge.max_new_tokens, constraint))
                if self.sharing.enabled:
                    keys.append(call_key(model.name, model.engine.revision, judge.name, parts, digests))
        outcomes = await self.sharing.run(
            model.runner,
            requests,
            keys,
            hit=lambda n: self.metrics.cache_hits.labels(model=model.task.name).inc(n),
            deadline=deadline,
        )
        judged = [Judged(error=item if isinstance(item, ItemError) else None) for item in items]
        for call, outcome in zip(calls, outcomes, strict=True):
            self._record(judged[call.item], call.judge, outcome)
        return judged

    def _record(self, judged: Judged, judge: Judge, outcome: GenerationResult | BaseException) -> None:
        if isinstance(outcome, DeadlineMissed):
            judged.error = judged.error or ItemError(code="deadline", message=str(outcome))
            return
        if isinstance(outcome, BaseException):
            judged.error = judged.error or ItemError(code="engine_error", message=str(outcome))
            return
        try:
            verdict = judge.judge(outcome)
        except ParseError as exc:
            self.metrics.parse_failures.labels(judge=judge.name).inc()
            cut = "" if outcome.finished else f" (cut off at its budget of {judge.max_new_tokens} new tokens)"
            judged.error = judged.error or ItemError(
                code="parse_error", message=f"{judge.name}: {exc}{cut}", field=judge.name
            )
            return
        judged.outcomes[judge.name] = verdict
        for key, value in verdict.scores.items():
            dimension = judge.name if key == "score" else f"{judge.name}.{key}"
            self.metrics.scores.labels(dimension=dimension).observe(value)
