"""The critics' lifecycle: load, sleep, wake, close, and the state each task's model is in.

Tasks served by one checkpoint share one engine; the engine is started, put to sleep and closed
once, and its tasks change state together.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from clients.protocol import ModelRef, Task
from server.batching import Runner
from server.engines.base import Engine
from server.errors import ModelDisabled, NotReady, Unsupported
from server.judges import Judge
from server.tasks import SERVER_TASKS, ServerTask

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    """What `/readyz` and `/v1/models` say of a task's model; only `READY` scores."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DISABLED = "disabled"  # switched off in the settings
    SLEEPING = "sleeping"
    UNHEALTHY = "unhealthy"  # loaded, but its engine keeps failing; a success brings it back
    DRAINING = "draining"  # shutting down: no new requests
    DEGRADED = "degraded"  # scoring, but its canaries answer differently from their reference

    @property
    def retry_after(self) -> float:
        """How long a caller refused in this state should wait before trying again."""
        return {ModelState.LOADING: 10.0, ModelState.SLEEPING: 30.0, ModelState.FAILED: 60.0}.get(self, 30.0)


@dataclass
class TaskModel:
    """One task's critic: the engine that serves it, how calls reach it, and its judges."""

    task: ServerTask
    name: str
    engine: Engine
    runner: Runner
    judges: tuple[Judge, ...]
    engine_reason: str | None = None
    state: ModelState = ModelState.LOADING

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, revision=self.engine.revision)


class Lifecycle:
    """Loads the engines, tracks each task's state, and refuses work a model cannot take."""

    def __init__(self, models: Mapping[Task, TaskModel]) -> None:
        self.models = dict(models)
        self.draining = False
        self.degraded: set[Task] = set()  # tasks whose canaries drifted (`server.watch.canary`)

    def _engine_groups(self) -> list[list[TaskModel]]:
        """The task models grouped by engine: a shared engine is started, put to sleep and closed once."""
        groups: dict[int, list[TaskModel]] = {}
        for model in self.models.values():
            groups.setdefault(id(model.engine), []).append(model)
        return list(groups.values())

    @staticmethod
    def _set(sharing: list[TaskModel], state: ModelState) -> None:
        for model in sharing:
            model.state = state

    async def start(self) -> None:
        for sharing in self._engine_groups():
            first = sharing[0]
            try:
                await first.engine.start()
                await first.runner.start()
            except Exception:
                log.exception("failed to load %s", first.name)
                self._set(sharing, ModelState.FAILED)
                continue
            self._set(sharing, ModelState.READY)
            for model in sharing:
                log.info("%s model %s is ready (engine %s)", model.task.name, model.name, model.engine.name)

    async def sleep(self) -> dict[str, str]:
        """Offload every engine's weights; scoring answers 503 until `wake`."""
        self._check_sleep_support()
        for sharing in self._engine_groups():
            if sharing[0].state != ModelState.READY:
                continue
            self._set(sharing, ModelState.SLEEPING)  # before the engine call: no new call on weights being offloaded
            try:
                await sharing[0].engine.sleep()
            except BaseException:
                self._set(sharing, ModelState.READY)  # the weights stayed: keep scoring rather than refuse until a wake
                raise
            log.info("%s is asleep", "+".join(m.task.name for m in sharing))
        return self.states()

    async def wake(self) -> dict[str, str]:
        self._check_sleep_support()
        for sharing in self._engine_groups():
            if sharing[0].state != ModelState.SLEEPING:
                continue
            await sharing[0].engine.wake()
            self._set(sharing, ModelState.READY)
            log.info("%s is awake", "+".join(m.task.name for m in sharing))
        return self.states()

    def _check_sleep_support(self) -> None:
        for model in self.models.values():
            if not model.engine.supports_sleep:
                raise Unsupported(f"the {model.engine.name} engine of the {model.task.name} model cannot sleep")

    async def close(self) -> None:
        for first, *_ in self._engine_groups():
            await first.runner.close()
            await first.engine.close()

    def state(self, task: Task) -> ModelState:
        model = self.models.get(task)
        if model is None:
            return ModelState.DISABLED
        state = model.state
        if state == ModelState.READY and not model.runner.healthy:
            state = ModelState.UNHEALTHY  # still scoring, so a success can bring it back
        elif state == ModelState.READY and task in self.degraded:
            state = ModelState.DEGRADED  # still scoring: the watch page and /readyz say so
        return ModelState.DRAINING if self.draining else state

    def states(self) -> dict[str, str]:
        """Every task's state, switched-off ones included, in table order."""
        return {task: self.state(task) for task in SERVER_TASKS}

    def set_degraded(self, task: Task, degraded: bool) -> None:
        if degraded:
            self.degraded.add(task)
        else:
            self.degraded.discard(task)

    def begin_drain(self) -> None:
        """Shutdown has begun: readiness turns false and new scoring requests are refused."""
        self.draining = True

    def ready_model(self, task: ServerTask) -> TaskModel:
        """`task`'s model, when it can score now; else the refusal that says why."""
        model = self.models.get(task.name)
        if model is None:
            raise ModelDisabled(
                f"the {task.name} model is switched off on this server, so /v1/{task.name}/* is unavailable"
            )
        if model.state != ModelState.READY:
            raise NotReady(f"the {task.name} model is {model.state}", retry_after=model.state.retry_after)
        return model
