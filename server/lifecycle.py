"""The critics' lifecycle: load, sleep, wake, close, and the state each task's model is in.

Tasks served by one checkpoint share one engine; the engine is started, put to sleep and closed
once, and its tasks change state together.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from clients.protocol import ModelRef, Task
from foundation.daemon import run_in_daemon
from foundation.flags import flag
from server.batching import Runner
from server.checkpoints.hub import CheckpointUnavailable
from server.checkpoints.memory import MemoryRefusal
from server.checkpoints.provision import Checkpoint, Provisioner
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
    failure: str | None = None  # why it is FAILED, in words that say what to do

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, revision=self.engine.revision)


class Lifecycle:
    """Loads the engines, tracks each task's state, and refuses work a model cannot take."""

    def __init__(self, models: Mapping[Task, TaskModel], provisioner: Provisioner | None = None) -> None:
        self.models = dict(models)
        self.provisioner = provisioner  # fetches and checks checkpoints first; None: engines load on their own
        self.draining = False
        self.abandoned: list[str] = []  # preparations, downloads and loads cut short by shutdown, whose threads run on
        self.degraded: set[Task] = set()  # tasks whose canaries drifted (`server.watch.canary`)
        # the first canary run is taking its reference: loaded models say `loading` and take no traffic yet
        self.taking_reference = False

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
        """Bring every critic up in the order that fails soonest: each checkpoint's file list and config
        (a failure here is said within seconds), the memory check over all of them, then per engine the
        download, the load to its device, and ready; each phase is logged with its duration."""
        groups = self._engine_groups()
        checkpoints: dict[int, Checkpoint] = {}
        if self.provisioner is not None:
            for sharing in groups:
                if (checkpoint := await self._prepare(sharing)) is not None:
                    checkpoints[id(sharing[0].engine)] = checkpoint
            try:
                self.provisioner.check(list(checkpoints.values()))
            except MemoryRefusal as exc:
                for sharing in groups:
                    checkpoint = checkpoints.get(id(sharing[0].engine))
                    if checkpoint is not None and checkpoint.label in exc.labels:
                        self._fail(sharing, f"refused by the memory check: {exc}")
            except Exception:  # a fault the check does not foresee (an unreadable device it does): loading goes on
                log.exception("memory check skipped: it failed")
        for sharing in groups:
            if sharing[0].state == ModelState.LOADING:
                await self._bring_up(sharing, checkpoints.get(id(sharing[0].engine)))

    def _label(self, sharing: list[TaskModel]) -> str:
        return "+".join(m.task.name for m in sharing)

    async def _prepare(self, sharing: list[TaskModel]) -> Checkpoint | None:
        first = sharing[0]
        if self.provisioner is None or not first.engine.loads_checkpoint:
            return None
        tasks = [m.task.name for m in sharing]
        try:
            return await run_in_daemon(
                functools.partial(self.provisioner.prepare, tasks, first.engine), name=f"prepare {first.engine.model}"
            )
        except Exception as exc:  # noqa: BLE001 - logged and shown in /readyz by _fail_by
            self._fail_by(sharing, f"{first.engine.model} could not be prepared", exc)
        except BaseException:  # cancelled: the server is stopping while the hub is asked
            self._stopped_during(f"preparation of {first.engine.model}")
            raise
        return None

    async def _bring_up(self, sharing: list[TaskModel], checkpoint: Checkpoint | None) -> None:
        first, label = sharing[0], self._label(sharing)
        began = phase = time.monotonic()
        if checkpoint is not None and checkpoint.listing is not None and self.provisioner is not None:
            try:
                folder = await run_in_daemon(
                    functools.partial(self.provisioner.download, checkpoint), name=f"download {checkpoint.model}"
                )
            except Exception as exc:  # noqa: BLE001 - the hub, the cache, the disk: logged and shown by _fail_by
                self._fail_by(sharing, f"{checkpoint.model} could not be downloaded", exc)
                return
            except BaseException:  # cancelled: the server is stopping
                self._stopped_during(f"download of {checkpoint.model}", " (the next start resumes it)")
                raise
            if folder is not None:  # the engine loads what was fetched, without asking the hub again
                first.engine.use_files(folder, checkpoint.listing.commit)
            log.info("%s critic %s: download took %.1f s", label, first.name, time.monotonic() - phase)
            phase = time.monotonic()
        try:
            await first.engine.start()
            await first.runner.start()
            loaded = time.monotonic()
            if await first.engine.warm_up():
                log.info("%s critic %s: warm-up took %.1f s", label, first.name, time.monotonic() - loaded)
        except Exception as exc:  # noqa: BLE001 - a failed load: logged, shown by /readyz, the process serves on
            self._fail_by(sharing, f"{first.name} failed to load", exc)
            return
        except BaseException:  # cancelled: the server is stopping
            self._stopped_during(f"load of {first.name}")
            raise
        self._set(sharing, ModelState.READY)
        plan = first.engine.memory_plan()
        where = plan.device if plan is not None else "its server"
        for model in sharing:
            log.info(
                "%s model %s is ready (engine %s): load to %s took %.1f s, %.1f s in all",
                model.task.name,
                model.name,
                model.engine.name,
                where,
                loaded - phase,
                time.monotonic() - began,
            )

    def _stopped_during(self, what: str, note: str = "") -> None:
        """A start cut short by shutdown in `what`: said, and kept so that the process exits without waiting
        for the thread still doing it."""
        log.warning("%s abandoned%s", what, note)
        self.abandoned.append(what)

    def _fail_by(self, sharing: list[TaskModel], what: str, exc: Exception) -> None:
        """Failed by `exc`: a checkpoint that cannot be had says why in its own words (with what to do), any
        other error is logged with its traceback and named in the reason's first line."""
        if isinstance(exc, CheckpointUnavailable):
            self._fail(sharing, exc.describe(flag(f"{sharing[0].task.name}_model")))
            return
        log.error("%s", what, exc_info=exc)
        self._fail(sharing, f"{what}: {type(exc).__name__}: {exc}".splitlines()[0][:500])

    def _fail(self, sharing: list[TaskModel], reason: str) -> None:
        for model in sharing:
            model.state, model.failure = ModelState.FAILED, reason
        log.error("the %s critic cannot be served: %s", self._label(sharing), reason)

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
            log.info("%s is asleep", self._label(sharing))
        return self.states()

    async def wake(self) -> dict[str, str]:
        self._check_sleep_support()
        for sharing in self._engine_groups():
            if sharing[0].state != ModelState.SLEEPING:
                continue
            await sharing[0].engine.wake()
            self._set(sharing, ModelState.READY)
            log.info("%s is awake", self._label(sharing))
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
        if state == ModelState.READY and self.taking_reference:
            state = ModelState.LOADING  # the canaries' reference comes before any traffic
        elif state == ModelState.READY and not model.runner.healthy:
            state = ModelState.UNHEALTHY  # still scoring, so a success can bring it back
        elif state == ModelState.READY and task in self.degraded:
            state = ModelState.DEGRADED  # still scoring: the watch page and /readyz say so
        return ModelState.DRAINING if self.draining else state

    def states(self) -> dict[str, str]:
        """Every task's state, switched-off ones included, in table order."""
        return {task: self.state(task) for task in SERVER_TASKS}

    def failures(self) -> dict[str, str]:
        """Why each failed task's model failed."""
        return {task: model.failure for task, model in self.models.items() if model.failure is not None}

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
            why = f": {model.failure}" if model.failure else ""
            state = "cannot be served" if model.state == ModelState.FAILED else f"is {model.state}"
            raise NotReady(f"the {task.name} model {state}{why}", retry_after=model.state.retry_after)
        if self.taking_reference:
            raise NotReady(
                f"the {task.name} model is loading: its canaries are taking their reference answers",
                retry_after=ModelState.LOADING.retry_after,
            )
        return model
