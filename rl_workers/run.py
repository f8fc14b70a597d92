"""Wire a worker together from its settings: ranks, generator, critic, prompts, metrics."""

from __future__ import annotations

import logging

import torch

from rl_workers.distributed import Ranks, init_from_env, local_rank, shutdown, sum_across
from rl_workers.generators import load_generator, resolve_device
from rl_workers.observability import MetricsLog
from rl_workers.prompts import endless, load_conditions
from rl_workers.rewards import RemoteCritic
from rl_workers.settings import RolloutSettings
from rl_workers.worker import RolloutWorker

log = logging.getLogger("firm-rollout")


def check_critic(critic: RemoteCritic, ranks: Ranks, device: torch.device) -> None:
    """Fail fast, on every rank together, when any rank's reward server cannot score the task."""
    problem = critic.problem()
    failed = sum_across({"failed": float(problem is not None)}, ranks, device)["failed"]
    if problem is not None:
        raise ValueError(problem)
    if failed:
        raise ValueError(f"{int(failed)} other rank(s) cannot use their reward server (see their messages)")


def run(settings: RolloutSettings) -> list[dict[str, float]]:
    """Train for `settings.steps` steps; returns each step's figures."""
    device = resolve_device(settings.device, local_rank())
    ranks = init_from_env(device)
    critic = None
    metrics = None
    try:
        torch.manual_seed(settings.seed + ranks.rank)
        conditions = load_conditions(settings.prompts, settings.task, ranks.rank, ranks.world)
        critic = RemoteCritic(settings.task, settings.reward_url, score_mode=settings.score_mode)
        check_critic(critic, ranks, device)
        generator = load_generator(settings, device)
        if ranks.main:
            metrics = MetricsLog(
                settings.output_dir,
                tensorboard=settings.tensorboard,
                wandb_project=settings.wandb_project,
                config=settings.model_dump(mode="json"),
            )
        log.info(
            "rank %d/%d: %s on %s, %d prompts, G=%d", ranks.rank, ranks.world,
            "tiny pipeline" if settings.tiny else settings.model_id, device,
            len(conditions), settings.group_size,
        )  # fmt: skip
        worker = RolloutWorker(
            settings,
            generator,
            critic,
            endless(conditions, settings.seed + ranks.rank),
            ranks,
            metrics,
            eval_conditions=endless(conditions, settings.seed + ranks.rank + 1),  # training order unchanged
        )
        return worker.run()
    finally:
        if metrics is not None:
            metrics.close()
        if critic is not None:
            critic.close()
        shutdown(ranks)
