"""One rollout worker: sample groups, have them scored, update the LoRA policy, log, checkpoint.

A training step samples `groups_per_step` groups; each group goes to the reward server as soon as
it is decoded, and with overlap on the worker samples the next group while the server scores the
last (it waits only when it needs the rewards, right before the update).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from rl_workers.advantages import group_advantages
from rl_workers.distributed import Ranks, average_gradients, sum_across
from rl_workers.generators.base import Condition, Generator
from rl_workers.grpo import Rollout, UpdateStats, accumulate_gradients, training_steps
from rl_workers.lora import add_lora, save_lora
from rl_workers.observability import MetricsLog
from rl_workers.rewards import COMPONENTS, RemoteCritic
from rl_workers.sampling import sample
from rl_workers.settings import RolloutSettings

log = logging.getLogger(__name__)


@dataclass
class Timings:
    sampling: float = 0.0
    reward_wait: float = 0.0
    training: float = 0.0


@dataclass
class StepResult:
    rollouts: list[Rollout]
    update: UpdateStats
    timings: Timings
    figures: dict[str, float] = field(default_factory=dict)


class RolloutWorker:
    def __init__(
        self,
        settings: RolloutSettings,
        generator: Generator,
        critic: RemoteCritic,
        conditions: Iterator[Condition],
        ranks: Ranks | None = None,
        metrics: MetricsLog | None = None,
    ) -> None:
        self.settings = settings
        self.generator = generator
        self.critic = critic
        self.conditions = conditions
        self.ranks = ranks or Ranks()
        self.metrics = metrics
        self.params = add_lora(generator.transformer, settings.lora_rank, settings.lora_alpha)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        seed = settings.seed + self.ranks.rank
        self.rng = torch.Generator().manual_seed(seed)
        self.noise_rng = torch.Generator(device="cpu").manual_seed(seed + 10_000)

    # ------------------------------------------------------------------ steps

    def sample_groups(self, conditions: list[Condition], timings: Timings, *, sde: bool = True) -> list[Rollout]:
        s = self.settings
        steps = s.sample_steps if sde else s.eval_steps
        rollouts = []
        for condition in conditions:
            started = time.perf_counter()
            conditioning, latents = self.generator.prepare(condition, s.group_size, self.noise_rng)
            trajectory = sample(
                self.generator,
                conditioning,
                latents,
                steps=steps,
                noise_level=s.noise_level,
                sde=sde,
                generator=self.noise_rng,
            )
            images = self.generator.decode(trajectory.latents[:, -1])
            timings.sampling += time.perf_counter() - started
            rollout = Rollout(condition, conditioning, trajectory, pending=self.critic.submit(condition, images))
            if not s.overlap:
                self._collect(rollout, timings)
            rollouts.append(rollout)
        for rollout in rollouts:
            self._collect(rollout, timings)
        return rollouts

    def _collect(self, rollout: Rollout, timings: Timings) -> None:
        if rollout.rewards is not None or rollout.pending is None:
            return
        started = time.perf_counter()
        rollout.rewards = rollout.pending.result()
        timings.reward_wait += time.perf_counter() - started
        rollout.advantages = group_advantages(rollout.rewards.rewards, self.settings.std_floor)
        for error in rollout.rewards.errors:
            log.warning("reward failed for group %s item %s", rollout.condition.id, error)

    def update(self, rollouts: list[Rollout]) -> UpdateStats:
        s = self.settings
        indices = training_steps(rollouts[0].trajectory.steps, s.timestep_fraction, self.rng)
        self.optimizer.zero_grad(set_to_none=True)
        stats = accumulate_gradients(
            self.generator,
            rollouts,
            step_indices=indices,
            noise_level=s.noise_level,
            clip_range=s.clip_range,
            kl_beta=s.kl_beta,
            batch_size=s.train_batch_size,
        )
        average_gradients(self.params, self.ranks)
        if any(p.grad is not None for p in self.params):
            stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm))
            self.optimizer.step()
        return stats

    def step(self) -> StepResult:
        timings = Timings()
        conditions = [next(self.conditions) for _ in range(self.settings.groups_per_step)]
        rollouts = self.sample_groups(conditions, timings)
        started = time.perf_counter()
        update = self.update(rollouts)
        timings.training = time.perf_counter() - started
        result = StepResult(rollouts, update, timings)
        result.figures = self.figures(result)
        return result

    def evaluate(self) -> float:
        """Mean reward of one ODE-sampled group per evaluation prompt (no training)."""
        timings = Timings()
        with torch.no_grad():
            rollouts = self.sample_groups([next(self.conditions)], timings, sde=False)
        rewards = [r for ro in rollouts for r in (ro.rewards.rewards if ro.rewards else []) if r is not None]
        return sum(rewards) / len(rewards) if rewards else math.nan

    # ------------------------------------------------------------------ figures

    def figures(self, result: StepResult) -> dict[str, float]:
        """The step's figures, summed over ranks where they are counts."""
        sums: dict[str, float] = {
            "items": 0,
            "failed": 0,
            "groups": 0,
            "zero_spread": 0,
            "r_sum": 0,
            "r_sq": 0,
            "r_n": 0,
        }
        for name in COMPONENTS[self.settings.task]:
            sums[f"{name}_sum"] = sums[f"{name}_n"] = 0
        for rollout in result.rollouts:
            assert rollout.rewards is not None and rollout.advantages is not None
            scored = [r for r in rollout.rewards.rewards if r is not None]
            sums["items"] += len(rollout.rewards.rewards)
            sums["failed"] += rollout.rewards.failed
            sums["groups"] += 1
            sums["zero_spread"] += rollout.advantages.zero_spread
            sums["r_sum"] += sum(scored)
            sums["r_sq"] += sum(r * r for r in scored)
            sums["r_n"] += len(scored)
            for name, values in rollout.rewards.components.items():
                present = [v for v in values if v is not None]
                sums[f"{name}_sum"] += sum(present)
                sums[f"{name}_n"] += len(present)
        u, t = result.update, result.timings
        means = {
            "train/loss": u.loss, "train/policy_loss": u.policy_loss, "train/kl": u.kl,
            "train/clip_fraction": u.clip_fraction, "train/max_ratio_deviation": u.max_ratio_deviation,
            "train/grad_norm": u.grad_norm, "time/sampling_s": t.sampling, "time/reward_wait_s": t.reward_wait,
            "time/training_s": t.training,
        }  # fmt: skip
        totals = sum_across(sums | {f"mean:{k}": v for k, v in means.items()}, self.ranks, self.generator.device)
        n = max(totals["r_n"], 1)
        mean = totals["r_sum"] / n
        figures = {
            "reward/mean": mean if totals["r_n"] else math.nan,
            "reward/std": math.sqrt(max(totals["r_sq"] / n - mean**2, 0.0)) if totals["r_n"] else math.nan,
            "reward/failed_fraction": totals["failed"] / max(totals["items"], 1),
            "groups/zero_spread": totals["zero_spread"],
            "groups/total": totals["groups"],
            "train/samples": totals["items"] - totals["failed"],
        }
        for name in COMPONENTS[self.settings.task]:
            count = totals[f"{name}_n"]
            figures[f"reward/{name}"] = totals[f"{name}_sum"] / count if count else math.nan
        figures |= {k: totals[f"mean:{k}"] / self.ranks.world for k in means}
        step_time = t.sampling + t.reward_wait + t.training
        figures["time/reward_wait_fraction"] = t.reward_wait / step_time if step_time else 0.0
        return figures

    # ------------------------------------------------------------------ the run

    def run(self) -> list[dict[str, float]]:
        s = self.settings
        history = []
        bar = tqdm(
            range(1, s.steps + 1), desc="firm-rollout", disable=not (s.progress and self.ranks.main), unit="step"
        )
        for number in bar:
            result = self.step()
            figures = result.figures
            if s.eval_every and number % s.eval_every == 0:
                figures["eval/reward_mean"] = self.evaluate()
            history.append(figures)
            bar.set_postfix(reward=f"{figures['reward/mean']:.3f}", wait=f"{figures['time/reward_wait_fraction']:.0%}")
            if self.ranks.main:
                if self.metrics is not None:
                    self.metrics.write(number, figures)
                if (s.save_every and number % s.save_every == 0) or number == s.steps:
                    self.save(number)
        return history

    def save(self, step: int) -> None:
        path = self.settings.output_dir / f"checkpoint-{step}"
        settings: dict[str, Any] = self.settings.model_dump(mode="json")
        save_lora(self.generator.pipeline, path, settings, step)  # type: ignore[attr-defined]
        log.info("saved LoRA weights of step %d to %s", step, path)
