"""The Ray Serve application: critic deployments behind one HTTP ingress.

    serve run deploy/ray/serve_config.yaml                 # a config file (see deploy/ray/README.md)
    serve run deploy.ray.app:build num_gpus=1 max_replicas=4

Every critic in every replica (the default) gives one deployment, `FirmCritic`; `split: true`
gives each task's critic a deployment of its own (`FirmEditCritic`, `FirmGenCritic`, ...), each
with its own replicas. `FirmIngress` serves the HTTP API and sends each scoring request to its
task's deployment, and `FirmMetricsBoard` gathers every replica's metrics for `/metrics`.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from clients.tasks import TASKS
from deploy.ray.critic import FirmCritic
from deploy.ray.metrics import MetricsBoard
from deploy.ray.router import FirmIngress
from deploy.ray.settings import RaySettings


def critic_name(task: str | None) -> str:
    """The deployment name of `task`'s critic, or of the one serving every critic (`task` None)."""
    return f"Firm{(task or '').capitalize()}Critic"


def build(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy`: `args` are `RaySettings` fields."""
    return build_app(RaySettings(**args))


def build_app(settings: RaySettings) -> Application:
    board = MetricsBoard.options(name="FirmMetricsBoard").bind(stale_after_s=3 * settings.metrics_push_interval_s)
    if settings.split:
        deployments = {task: _critic(settings, task, board) for task in settings.critic_tasks()}
        first = next(iter(deployments.values()))  # answers for a switched-off task: it is switched off there too
        critics = {task: deployments.get(task, first) for task in TASKS}
    else:
        critic = _critic(settings, None, board)
        critics = {task: critic for task in TASKS}
    ingress = FirmIngress.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        max_ongoing_requests=max(1000, 4 * settings.max_ongoing_requests),
    )
    return ingress.bind(
        critics,
        board,
        settings.critic_overrides(),
        attempts=settings.forward_attempts,
        require_api_keys=settings.require_api_keys,
        push_interval_s=settings.metrics_push_interval_s,
    )


def _critic(settings: RaySettings, task: str | None, board: Application) -> Application:
    """One critic deployment: every critic (`task` None) or one, autoscaled on requests in flight."""
    deployment = FirmCritic.options(
        name=critic_name(task),
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        autoscaling_config=settings.autoscaling(),
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
    )
    return deployment.bind(
        settings.critic_overrides(task), board=board, push_interval_s=settings.metrics_push_interval_s
    )
