"""The scoring service: decoded images -> judge calls -> parsed scores -> rewards.

Every judge call of a request (both dimensions of every item, every candidate of a group) is
submitted to the engine at once so they can share a batch. A failure stays with its item: an
undecodable image, an engine error or an unparsable answer gives that item `reward: null` and
an `error`, never a 0, and is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clients.protocol import (
    EditGroupRequest,
    EditGroupResponse,
    EditScoreRequest,
    EditScoreResponse,
    GenGroupRequest,
    GenGroupResponse,
    GenScoreRequest,
    GenScoreResponse,
    ItemError,
    JudgeCard,
    ModelCard,
    ModelRef,
    RewardWeights,
    ScoreMode,
    Task,
)
from server import rewards
from server.audit import AuditLog
from server.batching import Runner
from server.engines.base import Engine, GenerationRequest, GenerationResult
from server.errors import DeadlineExceeded, ModelDisabled, NotReady, Overloaded, TooLarge, Unsupported
from server.images import ImageLimits, InvalidImage, decode_image
from server.judge_cache import CallSharing, call_key
from server.judges import Judge, ParseError, edit_fields, gen_fields
from server.logs import request_id
from server.metrics import Metrics
from server.results import Judged, Response, edit_results, gen_results, without_reasoning

log = logging.getLogger(__name__)

LOADING, READY, FAILED, DISABLED, SLEEPING = "loading", "ready", "failed", "disabled", "sleeping"
UNHEALTHY, DRAINING = "unhealthy", "draining"
_RETRY_AFTER = {LOADING: 10.0, SLEEPING: 30.0, FAILED: 60.0}


@dataclass
class TaskModel:
    """One task's critic: the engine that serves it, how calls reach it, and its judges."""

    task: Task
    name: str
    engine: Engine
    runner: Runner
    judges: tuple[Judge, ...]
    engine_reason: str | None = None
    state: str = LOADING

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, revision=self.engine.revision)


@dataclass(frozen=True)
class Prepared:
    """An item ready for judging: its images in prompt order and the template fields."""

    images: tuple[Image.Image, ...]
    fields: dict[str, str | None]


def _decode_all(images: Sequence[tuple[str, str]], limits: ImageLimits) -> list[Image.Image | ItemError]:
    """Decode (field, data) pairs; an undecodable image becomes an ItemError, a too-large one raises."""
    decoded: list[Image.Image | ItemError] = []
    for name, data in images:
        try:
            decoded.append(decode_image(data, name, limits))
        except InvalidImage as exc:
            decoded.append(ItemError(code="invalid_image", message=str(exc), field=exc.field))
    return decoded


class ScoringService:
    def __init__(
        self,
        models: dict[Task, TaskModel],
        metrics: Metrics,
        *,
        limits: ImageLimits,
        max_items: int,
        score_mode: ScoreMode,
        cme_weights: RewardWeights,
        qma_weights: RewardWeights,
        structured_outputs: bool = False,
        request_timeout_s: float = 300.0,
        max_queue: int = 1024,
        cache_size: int = 0,
        audit: AuditLog | None = None,
    ) -> None:
        self.models, self.metrics, self.limits = models, metrics, limits
        self.structured_outputs = structured_outputs
        self.request_timeout_s, self.max_queue = request_timeout_s, max_queue
        self.sharing = CallSharing(cache_size)
        self.audit = audit
        self.in_flight = 0
        self.draining = False
        self._pending_calls: dict[str, int] = {task: 0 for task in models}
        self.max_items, self.score_mode = max_items, score_mode
        self.cme_weights, self.qma_weights = cme_weights, qma_weights

    # ------------------------------------------------------------------ lifecycle

    def _engine_groups(self) -> list[list[TaskModel]]:
        """The task models grouped by engine: a shared engine is started, put to sleep and closed once."""
        groups: dict[int, list[TaskModel]] = {}
        for model in self.models.values():
            groups.setdefault(id(model.engine), []).append(model)
        return list(groups.values())

    async def start(self) -> None:
        for sharing in self._engine_groups():
            first = sharing[0]
            try:
                await first.engine.start()
                await first.runner.start()
            except Exception:
                log.exception("failed to load %s", first.name)
                for model in sharing:
                    model.state = FAILED
                continue
            for model in sharing:
                model.state = READY
                log.info("%s model %s is ready (engine %s)", model.task, model.name, model.engine.name)

    async def sleep(self) -> dict[str, str]:
        """Offload every engine's weights; scoring answers 503 until `wake`."""
        self._check_sleep_support()
        for sharing in self._engine_groups():
            if sharing[0].state != READY:
                continue
            for model in sharing:
                model.state = SLEEPING  # before the engine call: no new call may start on weights being offloaded
            try:
                await sharing[0].engine.sleep()
            except BaseException:
                for model in sharing:  # the weights stayed: keep scoring rather than answer 503 until a wake
                    model.state = READY
                raise
            log.info("%s is asleep", "+".join(m.task for m in sharing))
        return self.states()

    async def wake(self) -> dict[str, str]:
        self._check_sleep_support()
        for sharing in self._engine_groups():
            if sharing[0].state != SLEEPING:
                continue
            await sharing[0].engine.wake()
            for model in sharing:
                model.state = READY
            log.info("%s is awake", "+".join(m.task for m in sharing))
        return self.states()

    def _check_sleep_support(self) -> None:
        for model in self.models.values():
            if not model.engine.supports_sleep:
                raise Unsupported(f"the {model.engine.name} engine of the {model.task} model cannot sleep")

    async def close(self) -> None:
        for first, *_ in self._engine_groups():
            await first.runner.close()
            await first.engine.close()

    def states(self) -> dict[str, str]:
        states = {}
        for task in ("edit", "gen"):
            model = self.models.get(task)  # type: ignore[call-overload]
            state = DISABLED if model is None else model.state
            if state == READY and not model.runner.healthy:
                state = UNHEALTHY  # still scoring, so a success can bring it back
            states[task] = DRAINING if self.draining and state != DISABLED else state
        return states

    def begin_drain(self) -> None:
        """Shutdown has begun: readiness turns false and new scoring requests are refused."""
        self.draining = True
        log.info("draining: %d requests in flight", self.in_flight)

    @contextlib.asynccontextmanager
    async def _guard(self, model: TaskModel, calls: int) -> AsyncIterator[None]:
        """Every scoring request: refused while draining or when its model's queue is full, counted in
        flight from arrival (decoding included) to answer, and bounded by the server deadline."""
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            raise NotReady("the server is shutting down; retry on another replica", retry_after=5)
        self._admit(model, calls)
        self.in_flight += 1
        self._pending_calls[model.task] += calls
        try:
            async with asyncio.timeout(self.request_timeout_s):
                yield
        except TimeoutError as exc:
            self.metrics.rejected.labels(reason="deadline").inc()
            raise DeadlineExceeded(
                f"the request took longer than the server deadline of {self.request_timeout_s:g} s; "
                "its engine work was cancelled"
            ) from exc
        finally:
            self.in_flight -= 1
            self._pending_calls[model.task] -= calls

    def overloaded(self, task: str, calls: int = 1) -> Overloaded | None:
        """The refusal (counted) when `calls` more judge calls would overflow `task`'s queue, with a
        Retry-After from the recent drain rate; None when they fit. Pending calls are those of every
        request of this model not yet answered. With the default of one call it tells, before a
        body is read, whether the queue is already full."""
        model = self.models.get(task)  # type: ignore[call-overload]
        if model is None:  # a switched-off task: the route answers 404 itself
            return None
        pending = self._pending_calls[task]
        if pending + calls <= self.max_queue:
            return None
        self.metrics.rejected.labels(reason="overloaded").inc()
        rate = model.runner.drain_rate()
        wait = (pending + calls) / rate if rate else 1.0
        return Overloaded(
            f"{pending} judge calls are already pending for the {task} model (limit {self.max_queue}); retry later",
            limit=self.max_queue,
            retry_after=min(max(wait, 1.0), 60.0),
        )

    def _admit(self, model: TaskModel, calls: int) -> None:
        """Refuse work the queue cannot take, before any of it is done."""
        if (refusal := self.overloaded(model.task, calls)) is not None:
            raise refusal

    def cards(self) -> list[ModelCard]:
        return [
            ModelCard(
                task=m.task,
                name=m.name,
                revision=m.engine.revision,
                engine=m.engine.name,
                engine_reason=m.engine_reason,
                dimensions=[j.name for j in m.judges],
                reward="CME" if m.task == "edit" else "QMA",
                judges=[
                    JudgeCard(
                        name=j.name,
                        prompt_source=j.origin,
                        prompt_sha256=j.sha256,
                        prompt_verified=j.verified,
                        max_new_tokens=j.max_new_tokens,
                    )
                    for j in m.judges
                ],
            )
            for m in self.models.values()
        ]

    def _model(self, task: Task) -> TaskModel:
        model = self.models.get(task)
        if model is None:
            route = "/v1/edit/*" if task == "edit" else "/v1/gen/*"
            raise ModelDisabled(f"the {task} model is switched off on this server, so {route} is unavailable")
        if model.state != READY:
            raise NotReady(f"the {task} model is {model.state}", retry_after=_RETRY_AFTER.get(model.state, 30.0))
        return model

    def _check_count(self, count: int, what: str) -> None:
        if count > self.max_items:
            raise TooLarge(
                f"{count} {what} in one request; this server accepts at most {self.max_items}",
                limit=self.max_items,
            )

    # ------------------------------------------------------------------ judging

    async def _judge(self, model: TaskModel, items: Sequence[Prepared | ItemError]) -> list[Judged]:
        calls: list[tuple[int, Judge]] = []
        requests: list[GenerationRequest] = []
        keys: list[str] = []
        digests: dict[int, str] = {}
        for index, item in enumerate(items):
            if isinstance(item, Prepared):
                for judge in model.judges:
                    calls.append((index, judge))
                    parts = judge.prompt(item.images, **item.fields)
                    constraint = judge.spec.constraint if self.structured_outputs else None
                    requests.append(GenerationRequest(parts, judge.max_new_tokens, constraint))
                    if self.sharing.enabled:
                        keys.append(call_key(model.name, model.engine.revision, judge.name, parts, digests))
        outcomes = await self.sharing.run(
            model.runner,
            requests,
            keys,
            hit=lambda n: self.metrics.cache_hits.labels(model=model.task).inc(n),
        )
        judged = [Judged(error=item if isinstance(item, ItemError) else None) for item in items]
        for (index, judge), outcome in zip(calls, outcomes, strict=True):
            self._record(judged[index], judge, outcome)
        return judged

    def _record(self, judged: Judged, judge: Judge, outcome: GenerationResult | BaseException) -> None:
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

    def _count(self, task: Task, judged: Sequence[Judged]) -> None:
        for item in judged:
            self.metrics.items.labels(task=task, outcome=item.error.code if item.error else "ok").inc()

    # ------------------------------------------------------------------ serving

    async def _serve(
        self, route: str, items: int, request: Any, work: Callable[[TaskModel, Any, bool], Awaitable[Response]]
    ) -> Response:
        """Run one scoring request under the guard; audit it; leave out reasoning nobody asked for."""
        started = time.perf_counter()
        model = self._model("edit" if route.startswith("edit") else "gen")
        self._check_count(items, "items" if route.endswith("/score") else "group members")
        async with self._guard(model, items * len(model.judges)):
            response = await work(model, request, request.return_reasoning or self.audit is not None)
        elapsed = time.perf_counter() - started
        failed = sum(r.reward is None for r in response.results)
        log.info("%s: %d items, %d failed, %.0f ms", route, len(response.results), failed, 1000 * elapsed)
        if self.audit is not None:
            self.audit.record(route, request_id.get(), response.model, response.results, elapsed)
            if not request.return_reasoning:
                response = without_reasoning(response)
        return response

    async def score(self, request: Any) -> Response:
        """Score any scoring request: its task and shape come from its class."""
        if isinstance(request, EditScoreRequest):
            return await self.score_edits(request)
        if isinstance(request, EditGroupRequest):
            return await self.score_edit_group(request)
        if isinstance(request, GenScoreRequest):
            return await self.score_generations(request)
        return await self.score_generation_group(request)

    # ------------------------------------------------------------------ editing

    async def score_edits(self, request: EditScoreRequest) -> EditScoreResponse:
        return await self._serve("edit/score", len(request.items), request, self._score_edits)

    async def _score_edits(self, model: TaskModel, request: EditScoreRequest, reasoning: bool) -> EditScoreResponse:
        fields = []
        for i, item in enumerate(request.items):
            fields += [(f"items[{i}].source", item.source), (f"items[{i}].edited", item.edited)]
        images = await asyncio.to_thread(_decode_all, fields, self.limits)
        prepared: list[Prepared | ItemError] = []
        for i, item in enumerate(request.items):
            source, edited = images[2 * i], images[2 * i + 1]
            bad = next((x for x in (source, edited) if isinstance(x, ItemError)), None)
            prepared.append(bad or Prepared((source, edited), edit_fields(item.instruction)))  # type: ignore[arg-type]
        judged = await self._judge(model, prepared)
        mode, weights = request.score_mode or self.score_mode, request.weights or self.cme_weights
        ids = [item.id if item.id is not None else str(i) for i, item in enumerate(request.items)]
        results = edit_results(ids, judged, mode, weights, reasoning)
        self._count("edit", judged)
        return EditScoreResponse(model=model.ref(), score_mode=mode, weights=weights, results=results)

    async def score_edit_group(self, request: EditGroupRequest) -> EditGroupResponse:
        return await self._serve("edit/score_group", len(request.candidates), request, self._score_edit_group)

    async def _score_edit_group(
        self, model: TaskModel, request: EditGroupRequest, reasoning: bool
    ) -> EditGroupResponse:
        fields = [("source", request.source)] + [(f"candidates[{i}]", c) for i, c in enumerate(request.candidates)]
        source, *candidates = await asyncio.to_thread(_decode_all, fields, self.limits)
        prepared: list[Prepared | ItemError] = [
            source
            if isinstance(source, ItemError)
            else c
            if isinstance(c, ItemError)
            else Prepared((source, c), edit_fields(request.instruction))
            for c in candidates
        ]
        judged = await self._judge(model, prepared)
        mode, weights = request.score_mode or self.score_mode, request.weights or self.cme_weights
        ids = [str(i) for i in range(len(candidates))]
        results = edit_results(ids, judged, mode, weights, reasoning)
        self._count("edit", judged)
        group = rewards.group_stats([r.reward for r in results])
        return EditGroupResponse(
            model=model.ref(), score_mode=mode, weights=weights, id=request.id, results=results, group=group
        )

    # ------------------------------------------------------------------ generation

    async def score_generations(self, request: GenScoreRequest) -> GenScoreResponse:
        return await self._serve("gen/score", len(request.items), request, self._score_generations)

    async def _score_generations(self, model: TaskModel, request: GenScoreRequest, reasoning: bool) -> GenScoreResponse:
        fields = [(f"items[{i}].image", item.image) for i, item in enumerate(request.items)]
        images = await asyncio.to_thread(_decode_all, fields, self.limits)
        prepared: list[Prepared | ItemError] = [
            image if isinstance(image, ItemError) else Prepared((image,), gen_fields(it.prompt, it.requirement))
            for image, it in zip(images, request.items, strict=True)
        ]
        judged = await self._judge(model, prepared)
        mode, weights = request.score_mode or self.score_mode, request.weights or self.qma_weights
        ids = [item.id if item.id is not None else str(i) for i, item in enumerate(request.items)]
        results = gen_results(ids, judged, mode, weights, reasoning)
        self._count("gen", judged)
        return GenScoreResponse(model=model.ref(), score_mode=mode, weights=weights, results=results)

    async def score_generation_group(self, request: GenGroupRequest) -> GenGroupResponse:
        return await self._serve("gen/score_group", len(request.images), request, self._score_generation_group)

    async def _score_generation_group(
        self, model: TaskModel, request: GenGroupRequest, reasoning: bool
    ) -> GenGroupResponse:
        fields = [(f"images[{i}]", image) for i, image in enumerate(request.images)]
        images = await asyncio.to_thread(_decode_all, fields, self.limits)
        text = gen_fields(request.prompt, request.requirement)
        prepared: list[Prepared | ItemError] = [
            image if isinstance(image, ItemError) else Prepared((image,), text) for image in images
        ]
        judged = await self._judge(model, prepared)
        mode, weights = request.score_mode or self.score_mode, request.weights or self.qma_weights
        results = gen_results([str(i) for i in range(len(images))], judged, mode, weights, reasoning)
        self._count("gen", judged)
        group = rewards.group_stats([r.reward for r in results])
        return GenGroupResponse(
            model=model.ref(), score_mode=mode, weights=weights, id=request.id, results=results, group=group
        )
