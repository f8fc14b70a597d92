"""The scoring service: a request -> decoded images -> judge calls -> parsed scores -> rewards.

One code path serves every task and route: the request's class names its task (the task table,
`server.tasks`), the task's layout turns the request into items, and the task's judges and
dimensions turn verdicts into results. Lifecycle, admission and judging are classes of their
own; this module ties them together. A failure stays with its item: an undecodable image, an
engine error or an unparsable answer gives that item `reward: null` and an `error`, never a 0,
and is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from PIL import Image

from clients.protocol import (
    ImageInput,
    ItemError,
    JudgeCard,
    ModelCard,
    ResolvedOptions,
    ScoringDefaults,
    ScoringRequest,
    ScoringResponse,
    Task,
)
from server import rewards
from server.admission import Admission
from server.audit import AuditLog
from server.checkpoints.provision import Provisioner
from server.errors import Overloaded, TooLarge
from server.images import ALLOWED_FORMATS, ImageLimits, InvalidImage, decode_image
from server.judge_cache import CallSharing
from server.judging import Judging, Prepared
from server.lifecycle import Lifecycle, TaskModel
from server.logs import request_id
from server.metrics import Metrics
from server.results import Judged, task_results, without_reasoning
from server.tasks import SERVER_TASKS, ItemInputs, ServerTask
from server.watch.canary import Canaries
from server.watch.looks import Looks
from server.watch.watch import Watch

log = logging.getLogger(__name__)


def _decode_all(images: Sequence[tuple[str, str]], limits: ImageLimits) -> dict[str, Image.Image | ItemError]:
    """Decode each distinct (field, data) pair once; an undecodable image becomes an ItemError, a
    too-large one raises."""
    decoded: dict[str, Image.Image | ItemError] = {}
    for name, data in images:
        if name in decoded:
            continue
        try:
            decoded[name] = decode_image(data, name, limits)
        except InvalidImage as exc:
            decoded[name] = ItemError(code="invalid_image", message=str(exc), field=exc.field)
    return decoded


def _prepare(inputs: Sequence[ItemInputs], limits: ImageLimits) -> list[Prepared | ItemError]:
    """Each item with its images decoded, or the error of its first undecodable image."""
    decoded = _decode_all([image for item in inputs for image in item.images], limits)
    prepared: list[Prepared | ItemError] = []
    for item in inputs:
        images = [decoded[name] for name, _ in item.images]
        bad = next((image for image in images if isinstance(image, ItemError)), None)
        prepared.append(bad or Prepared(tuple(images), item.fields))  # type: ignore[arg-type]
    return prepared


class ScoringService:
    def __init__(
        self,
        models: Mapping[Task, TaskModel],
        metrics: Metrics,
        *,
        limits: ImageLimits,
        max_items: int,
        defaults: ScoringDefaults,
        structured_outputs: bool = False,
        request_timeout_s: float = 300.0,
        max_queue: int = 1024,
        cache_size: int = 0,
        audit: AuditLog | None = None,
        provisioner: Provisioner | None = None,
        watch: Watch | None = None,
    ) -> None:
        self.metrics, self.limits, self.max_items, self.defaults = metrics, limits, max_items, defaults
        self.lifecycle = Lifecycle(models, provisioner)
        self.admission = Admission(self.lifecycle, metrics, max_queue=max_queue, request_timeout_s=request_timeout_s)
        self.judging = Judging(metrics, CallSharing(cache_size), structured_outputs=structured_outputs)
        self.audit = audit
        self.watch = watch
        self.canaries: Canaries | None = None
        self.canary_every = 0.0
        self._canary_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle and status

    @property
    def models(self) -> dict[Task, TaskModel]:
        return self.lifecycle.models

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    def add_canaries(self, canaries: Canaries, every: float) -> None:
        """Score `canaries` at start, after every wake and, when `every` is over 0, every `every` seconds."""
        self.canaries, self.canary_every = canaries, every

    def _canary_run(self, reason: str) -> asyncio.Task[None] | None:
        """A canary run in the background: a wake answers at once, the page and /readyz tell the outcome."""
        if self.canaries is None:
            return None
        task = asyncio.create_task(self.canaries.run(reason), name=f"canaries-{reason}")
        self._canary_tasks.add(task)
        task.add_done_callback(self._canary_tasks.discard)  # a run logs and counts its own failure
        return task

    async def start(self) -> None:
        # the first canary answers become the reference: taken before any traffic, so a critic that loads
        # before another takes none meanwhile, and /readyz and /v1/models say 'loading' until it is done
        self.lifecycle.taking_reference = self.canaries is not None
        try:
            await self.lifecycle.start()
            first = self._canary_run("start")
            if first is not None:  # bounded as a request is: a hung engine call does not hold readiness
                done, _ = await asyncio.wait({first}, timeout=self.admission.request_timeout_s)
                if not done:
                    log.warning("the first canary run took over %.0f s: readiness no longer waits for it",
                                self.admission.request_timeout_s)  # fmt: skip
        finally:
            self.lifecycle.taking_reference = False
        if self.canaries is not None and self.canary_every > 0:
            loop = asyncio.create_task(self.canaries.every(self.canary_every), name="canaries-schedule")
            self._canary_tasks.add(loop)

    async def sleep(self) -> dict[str, str]:
        return await self.lifecycle.sleep()

    async def wake(self) -> dict[str, str]:
        states = await self.lifecycle.wake()
        self._canary_run("wake")
        return states

    async def close(self) -> None:
        for task in list(self._canary_tasks):
            task.cancel()
        await asyncio.gather(*self._canary_tasks, return_exceptions=True)
        await self.lifecycle.close()

    def states(self) -> dict[str, str]:
        return self.lifecycle.states()

    def failures(self) -> dict[str, str]:
        return self.lifecycle.failures()

    def begin_drain(self) -> None:
        self.lifecycle.begin_drain()
        log.info("draining: %d requests in flight", self.in_flight)

    def overloaded(self, task: str, calls: int = 1) -> Overloaded | None:
        return self.admission.overloaded(task, calls)

    def cards(self) -> list[ModelCard]:
        return [
            ModelCard(
                task=m.task.name,
                name=m.name,
                revision=m.engine.revision,
                engine=m.engine.name,
                engine_reason=m.engine_reason,
                state=self.lifecycle.state(m.task.name),
                failure=m.failure,
                dimensions=[j.name for j in m.judges],
                reward=m.task.spec.reward,
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
                images=ImageInput(
                    formats=sorted(ALLOWED_FORMATS),
                    pixel_budget=self.limits.pixel_budget,
                    max_image_bytes=self.limits.max_bytes,
                    max_image_pixels=self.limits.max_pixels,
                ),
                batch_invariant=m.engine.batch_invariant,
            )
            for m in self.models.values()
        ]

    # ------------------------------------------------------------------ scoring

    async def score(self, request: ScoringRequest) -> ScoringResponse:
        """Score any scoring request: its task and shape come from its class. Run under admission,
        audited; reasoning nobody asked for is left out."""
        started = time.perf_counter()
        deadline = None if request.timeout_s is None else asyncio.get_running_loop().time() + request.timeout_s
        task = SERVER_TASKS[request.task]
        model = self.lifecycle.ready_model(task)
        is_group = isinstance(request, task.spec.group_request)
        inputs = task.layout(request)
        if len(inputs) > self.max_items:
            raise TooLarge(
                f"{len(inputs)} {'group members' if is_group else 'items'} in one request; "
                f"this server accepts at most {self.max_items}",
                limit=self.max_items,
            )
        options = request.resolve(self.defaults)
        reasoning = options.return_reasoning or self.audit is not None
        async with self.admission.admit(model, len(inputs) * len(model.judges)):
            prepared, looks = await asyncio.to_thread(self._prepare, task, inputs)
            judged = await self.judging.judge(model, prepared, deadline)
            response = self._respond(model, request, [item.id for item in inputs], judged, options, reasoning)
        elapsed = time.perf_counter() - started
        failed = sum(r.reward is None for r in response.results)
        route = task.spec.group_path if is_group else task.spec.score_path
        log.info("%s: %d items, %d failed, %.0f ms", route, len(response.results), failed, 1000 * elapsed)
        if self.watch is not None and looks is not None:
            self.watch.observe(task, inputs, looks, judged, response)
        if self.audit is not None:
            self.audit.record(route.removeprefix("/v1/"), request_id.get(), response.model, response.results, elapsed)
            if not options.return_reasoning:
                response = without_reasoning(response)
        return response

    def _prepare(
        self, task: ServerTask, inputs: Sequence[ItemInputs]
    ) -> tuple[list[Prepared | ItemError], list[Looks] | None]:
        """The items decoded and, for the watch, what it keeps of their images; in the decoding thread."""
        prepared = _prepare(inputs, self.limits)
        if self.watch is None:
            return prepared, None
        return prepared, self.watch.look(task, [p.images if isinstance(p, Prepared) else None for p in prepared])

    def _respond(
        self,
        model: TaskModel,
        request: ScoringRequest,
        ids: list[str],
        judged: list[Judged],
        options: ResolvedOptions,
        reasoning: bool,
    ) -> ScoringResponse:
        """The task's response message: results, and group statistics for a group request."""
        spec = model.task.spec
        results = task_results(model.task, ids, judged, options, reasoning)
        for item in judged:
            self.metrics.items.labels(task=spec.name, outcome=item.error.code if item.error else "ok").inc()
        common = {"model": model.ref(), "score_mode": options.score_mode, "weights": options.weights}
        if isinstance(request, spec.group_request):
            group = rewards.group_stats([r.reward for r in results])
            return spec.group_response(**common, id=request.id, results=results, group=group)  # type: ignore[call-arg]
        return spec.score_response(**common, results=results)  # type: ignore[call-arg]
