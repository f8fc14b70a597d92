"""Build the scoring service that the settings describe."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from clients.protocol import Task
from foundation.flags import flag
from server.audit import AuditLog
from server.batching import DirectRunner, MicroBatcher, Runner
from server.checkpoints.hub import HubAccess
from server.checkpoints.provision import Provisioner
from server.engines import Engine, create_engine, resolve_engine_name
from server.judges import SCORE_TOKENS
from server.lifecycle import TaskModel
from server.metrics import Metrics
from server.prompts.serving import released_prompts, task_judges
from server.scoring import ScoringService
from server.settings import Settings
from server.tasks import SERVER_TASKS
from server.watch.canary import Canaries
from server.watch.watch import Watch

log = logging.getLogger(__name__)


def model_sources(settings: Settings) -> dict[Task, tuple[str, str | None]]:
    """(checkpoint, revision) of each enabled task."""
    sources = {task: settings.model_source(task) for task in settings.enabled_tasks()}
    if settings.tiny:  # the tiny critic stands in for every enabled task
        from server.tiny import ensure_tiny_checkpoint

        # vLLM's CPU attention kernels take no head narrower than 32: the vllm engine gets the tiny critic shaped for it
        shape = "vllm" if resolve_engine_name(settings.engine)[0] == "vllm" else "cpu"
        path = str(ensure_tiny_checkpoint(settings.cache_dir, shape=shape))
        log.warning("SERVING A TINY RANDOM CRITIC from %s: its scores are meaningless (smoke test only)", path)
        sources = {task: (path, None) for task in sources}
    return sources


def _runner(engine: Engine, settings: Settings, metrics: Metrics, label: str) -> Runner:
    if engine.batches_itself:
        return DirectRunner(engine, metrics, label, unhealthy_after=settings.unhealthy_after)
    return MicroBatcher(
        engine,
        metrics,
        label,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        unhealthy_after=settings.unhealthy_after,
    )


def engine_options(settings: Settings, tasks: list[Task]) -> dict[str, Any]:
    """Every engine setting, for the tasks one engine serves; each engine takes what it needs."""
    memory = [settings.gpu_memory_utilization(task) for task in tasks]
    return {
        "device": settings.device,
        "dtype": settings.dtype,
        "seed": settings.seed,
        "max_model_len": settings.context_length(),
        "gpu_memory_utilization": sum(memory),
        "tensor_parallel_size": settings.tensor_parallel_size,
        "images_per_prompt": max(SERVER_TASKS[t].images_per_prompt for t in tasks),
        "pixel_budget": settings.image_pixel_budget,
        "prefix_caching": settings.prefix_caching,
        "group_prefill": settings.group_prefill,
        "sleep_mode": settings.sleep_mode,
        "enforce_eager": settings.enforce_eager,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "batch_invariant": settings.batch_invariant,
        "max_batch_size": settings.max_batch_size,
        "base_urls": settings.base_urls(),
        "api_key": settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        "served_model": settings.openai_model(tasks[0]),
        "timeout_s": settings.openai_timeout_s,
        "max_retries": settings.openai_max_retries,
        "max_connections": settings.openai_max_connections,
    }


def _check_context(settings: Settings, tasks: list[Task]) -> None:
    """Refuse a vLLM context that cannot hold a task's largest images, its template and its answer."""
    context = settings.context_length()
    for task in tasks:
        if (needed := settings.context_needed(task, text=False)) > context:
            raise ValueError(
                f"--max-model-len {context} cannot hold the largest images and answer of a call of the "
                f"{task} critic: {needed} tokens (images at --image-pixel-budget {settings.image_pixel_budget}, "
                f"the judge's template and {flag(f'{task}_max_new_tokens')} {settings.max_new_tokens(task)}); "
                "raise --max-model-len or leave it unset, or lower the pixel budget or the answer budget"
            )


Source = tuple[str, str | None]  # (checkpoint, revision)


def engine_groups(sources: dict[Task, Source]) -> dict[Source, list[Task]]:
    """The tasks of each distinct checkpoint and revision: they share one engine (and so one batch queue)."""
    groups: dict[Source, list[Task]] = {}
    for task, source in sources.items():
        groups.setdefault(source, []).append(task)
    return groups


def engine_for(
    settings: Settings, engine_name: str, source: Source, tasks: list[Task], registry: CollectorRegistry
) -> Engine:
    """The engine of `tasks`' checkpoint, built (not loaded), or a ValueError when the settings ask of it
    what it cannot do. An engine with figures of its own (vllm's scheduler) reports them on `registry`."""
    if engine_name == "vllm":
        _check_context(settings, tasks)
    options = engine_options(settings, tasks)
    engine = create_engine(engine_name, source[0], SCORE_TOKENS, revision=source[1], registry=registry, **options)
    if settings.structured_outputs and not engine.supports_constraints:
        raise ValueError(f"--structured-outputs needs an engine that supports it, not {engine.name}")
    if settings.batch_invariant and not engine.supports_batch_invariance:
        raise ValueError(
            f"--batch-invariant needs an engine that can give an item the same score whatever shares its "
            f"batch (transformers, or vllm where vLLM has the mode), not {engine.name}; a remote server "
            "decides for itself (start `vllm serve` with VLLM_BATCH_INVARIANT=1) and this setting stays off"
        )
    return engine


def build_service(settings: Settings, metrics: Metrics) -> ScoringService:
    """Engines are created here but load their weights in `ScoringService.start`. The judges' prompts
    are obtained first, so a server that cannot have them refuses to start before loading any weights.

    Tasks served by the same checkpoint and revision share one engine (and so one batch queue).
    """
    sources = model_sources(settings)
    released = released_prompts(settings)
    judges = {task: task_judges(settings, task, source[0], released) for task, source in sources.items()}
    engine_name, reason = resolve_engine_name(settings.engine)
    log.info("engine %s (%s)", engine_name, reason)
    models: dict[Task, TaskModel] = {}
    for source, tasks in engine_groups(sources).items():
        engine = engine_for(settings, engine_name, source, tasks, metrics.registry)
        runner = _runner(engine, settings, metrics, "+".join(tasks))
        for task in tasks:
            models[task] = TaskModel(
                task=SERVER_TASKS[task],
                name=settings.served_name(task),
                engine=engine,
                runner=runner,
                judges=judges[task],
                engine_reason=reason,
            )
    service = ScoringService(
        models,
        metrics,
        limits=settings.image_limits(),
        max_items=settings.max_items_per_request,
        defaults=settings.scoring_defaults(),
        structured_outputs=settings.structured_outputs,
        request_timeout_s=settings.request_timeout_s,
        max_queue=settings.max_queue,
        cache_size=settings.cache_size,
        audit=AuditLog(settings.audit_log, settings.audit_log_max_bytes) if settings.audit_log else None,
        provisioner=provisioner(settings),
        watch=Watch(
            [SERVER_TASKS[task] for task in models],
            metrics,
            samples=settings.watch_samples,
            window_s=settings.watch_window_s,
            baseline_s=settings.watch_baseline_s,
        ),
    )
    if settings.canaries:
        canaries = Canaries(
            service.lifecycle,
            metrics,
            tolerance=settings.canary_tolerance,
            reference=settings.canary_reference,
            user_set=settings.canary_set,
            structured_outputs=settings.structured_outputs,
        )
        service.add_canaries(canaries, settings.canary_every)
    return service


def provisioner(settings: Settings) -> Provisioner:
    """How the critics' checkpoints are fetched and checked before their engines load them."""
    return Provisioner(
        access=HubAccess.from_environment(settings.hub_retries, settings.hub_timeout_s),
        force=settings.force,
        tokens={t: (settings.context_needed(t), settings.typical_call(t)) for t in settings.enabled_tasks()},
    )
