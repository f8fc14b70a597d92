"""One rollout worker: sample groups, have them scored, update the LoRA policy, log, checkpoint.

A training step samples `groups_per_step` groups; each group goes to the reward server as soon as
it is decoded, and with overlap on the worker samples the next group while the server scores the
last (it waits only when it needs the rewards, right before the update). How a group is sampled
for training and the loss it trains with are the algorithm's (`--algorithm`, `rl_workers.algorithm`);
everything else here is shared.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from clients.tasks import TASKS
from rl_workers.advantages import std_of_sums, step_advantages
from rl_workers.algorithm import Algorithm, Rollout, TrainingStats, update_figures
from rl_workers.distributed import Ranks, average_gradients, broadcast_from_main, max_across, sum_across
from rl_workers.generators.base import Condition, Generator
from rl_workers.grpo import GRPO, training_steps
from rl_workers.lora import add_lora, save_lora
from rl_workers.nft import NFT
from rl_workers.observability import MetricsLog
from rl_workers.rewards import RemoteCritic
from rl_workers.sampling import sample
from rl_workers.settings import RolloutSettings
from rl_workers.shadow_weights import ShadowWeights, ema_keep

log = logging.getLogger(__name__)

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (GRPO, NFT)}  # by --algorithm


class StoppedWithoutRewards(RuntimeError):
    """No rank got a single reward for `max_failed_steps` consecutive steps: the run cannot learn."""


@dataclass
class Timings:
    sampling: float = 0.0
    reward_wait: float = 0.0
    training: float = 0.0


@dataclass
class StepResult:
    rollouts: list[Rollout]
    update: TrainingStats
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
        eval_conditions: Iterator[Condition] | None = None,
    ) -> None:
        self.settings = settings
        self.dimensions = TASKS[settings.task].dimensions  # the figures log each one's mean
        self.generator = generator
        self.critic = critic
        self.conditions = conditions
        self.eval_conditions = eval_conditions or conditions
        self.ranks = ranks or Ranks()
        self.metrics = metrics
        self.params = add_lora(generator.transformer, settings.lora_rank, settings.lora_alpha, settings.seed)
        broadcast_from_main(self.params, self.ranks)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        seed = settings.seed + self.ranks.rank
        self.rng = torch.Generator().manual_seed(seed)
        self.noise_rng = torch.Generator(device="cpu").manual_seed(seed + 10_000)
        self.algorithm = ALGORITHMS[settings.algorithm](generator, self.params, seed)
        self.ema = ShadowWeights(self.params) if settings.ema_decay else None  # evaluated and saved when kept
        self.optimizer_steps = 0  # over the run: the EMA's and the old adapter's schedules count them

    # ------------------------------------------------------------------ sampling and rewards

    def sample_groups(self, conditions: list[Condition], timings: Timings, *, training: bool = True) -> list[Rollout]:
        """Sample a group per condition and start its scoring: with the algorithm's training sampler (for NFT a
        deterministic one), or, for evaluation, the ODE sampler."""
        s = self.settings
        rollouts = []
        for condition in conditions:
            started = time.perf_counter()
            conditioning, latents = self.generator.prepare(condition, s.group_size, self.noise_rng)
            if training:
                trajectory = self.algorithm.sample(s, conditioning, latents, self.noise_rng)
            else:
                trajectory = sample(
                    self.generator, conditioning, latents, steps=s.eval_steps, noise_level=s.noise_level, sde=False
                )
            final = trajectory.latents[:, -1]  # decoded a few at a time: a group at once is the sampling peak
            images = [im for part in final.split(s.decode_batch) for im in self.generator.decode(part, conditioning)]
            timings.sampling += time.perf_counter() - started
            pending = self.critic.submit(condition, images, source=conditioning.group.get("source"))
            rollout = Rollout(condition, conditioning, trajectory, pending=pending)
            if not s.overlap:
                self._collect(rollout, timings)
            rollouts.append(rollout)
        for rollout in rollouts:
            self._collect(rollout, timings)
        self._advantages(rollouts)
        return rollouts

    def _collect(self, rollout: Rollout, timings: Timings) -> None:
        if rollout.rewards is not None or rollout.pending is None:
            return
        started = time.perf_counter()
        rollout.rewards = rollout.pending.result()
        timings.reward_wait += time.perf_counter() - started
        if rollout.rewards.errors:
            shown = "; ".join(rollout.rewards.errors[:3])
            log.warning("group %s: %d reward(s) failed: %s", rollout.condition.id, rollout.rewards.failed, shown)

    def _advantages(self, rollouts: list[Rollout]) -> None:
        s = self.settings
        rewards = [ro.rewards.rewards if ro.rewards is not None else [] for ro in rollouts]
        advantages = step_advantages(
            rewards,
            std_floor=s.std_floor,
            adv_std=s.adv_std,
            clip=s.adv_clip,
            ranks=self.ranks,
            device=self.generator.device,
        )
        for rollout, advantage in zip(rollouts, advantages, strict=True):
            rollout.advantages = advantage

    # ------------------------------------------------------------------ update

    def _mini_batches(self, rollouts: list[Rollout]) -> list[list[torch.Tensor]]:
        """The trainable samples, shuffled and split into `updates_per_step` mini-batches (rows per rollout)."""
        pieces = [
            (i, int(row))
            for i, rollout in enumerate(rollouts)
            if rollout.advantages is not None
            for row in torch.nonzero(self.algorithm.trainable(self.settings, rollout)).flatten()
        ]
        order = torch.randperm(len(pieces), generator=self.rng)
        batches = []
        for part in torch.tensor_split(order, self.settings.updates_per_step):
            rows: list[list[int]] = [[] for _ in rollouts]
            for index in part.tolist():
                i, row = pieces[index]
                rows[i].append(row)
            batches.append([torch.tensor(sorted(r), dtype=torch.long) for r in rows])
        return batches

    def update(self, rollouts: list[Rollout]) -> TrainingStats:
        s = self.settings
        stats = self.algorithm.new_stats()
        terms_per_sample = len(training_steps(rollouts[0].trajectory.steps, s.timestep_fraction))
        for rows in self._mini_batches(rollouts):
            count = sum(len(r) for r in rows)
            total = sum_across({"n": float(count)}, self.ranks, self.generator.device)["n"]
            if total == 0:  # no rank has a trainable sample in this mini-batch
                continue
            self.optimizer.zero_grad(set_to_none=True)
            norm = total * terms_per_sample / self.ranks.world  # the mean over every rank's terms
            stats.samples += count  # this rank's, whatever the algorithm
            self.algorithm.accumulate(s, rollouts, rows, stats, norm=norm)
            average_gradients(self.params, self.ranks)
            stats.grad_norm += float(torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm))
            self.optimizer.step()
            stats.optimizer_steps += 1
            self.optimizer_steps += 1
            if self.ema is not None:  # kept exactly when --ema-decay is set
                self.ema.blend(self.params, ema_keep(self.optimizer_steps, s.ema_decay))
        return stats

    def _kept_weights(self) -> AbstractContextManager[None]:
        """The weights evaluated and saved: the EMA's when one is kept, else the trained ones."""
        return self.ema.applied(self.params) if self.ema is not None else nullcontext()

    def step(self) -> StepResult:
        timings = Timings()
        conditions = [next(self.conditions) for _ in range(self.settings.groups_per_step)]
        rollouts = self.sample_groups(conditions, timings)
        started = time.perf_counter()
        update = self.update(rollouts)
        after = self.algorithm.after_step(self.settings, self.optimizer_steps)
        timings.training = time.perf_counter() - started
        result = StepResult(rollouts, update, timings)
        result.figures = self.figures(result) | after
        return result

    def evaluate(self) -> float:
        """Mean reward, over all ranks, of one group per rank sampled with the deterministic ODE sampler
        from the evaluation prompts (nothing trains)."""
        with torch.no_grad(), self._kept_weights():
            rollouts = self.sample_groups([next(self.eval_conditions)], Timings(), training=False)
        rewards = [r for ro in rollouts if ro.rewards for r in ro.rewards.rewards if r is not None]
        totals = sum_across({"sum": sum(rewards), "n": len(rewards)}, self.ranks, self.generator.device)
        return totals["sum"] / totals["n"] if totals["n"] else math.nan

    # ------------------------------------------------------------------ figures

    def _sums(self, result: StepResult) -> dict[str, float]:
        sums: dict[str, float] = {"items": 0, "failed": 0, "groups": 0, "zero_spread": 0, "r": 0, "r2": 0, "r_n": 0}
        for rollout in result.rollouts:
            assert rollout.rewards is not None and rollout.advantages is not None
            scored = [r for r in rollout.rewards.rewards if r is not None]
            sums["items"] += len(rollout.rewards.rewards)
            sums["failed"] += rollout.rewards.failed
            sums["groups"] += 1
            sums["zero_spread"] += rollout.advantages.zero_spread
            sums["r"] += sum(scored)
            sums["r2"] += sum(r * r for r in scored)
            sums["r_n"] += len(scored)
            for name, values in rollout.rewards.components.items():
                present = [v for v in values if v is not None]
                sums[f"{name}:sum"] = sums.get(f"{name}:sum", 0.0) + sum(present)
                sums[f"{name}:n"] = sums.get(f"{name}:n", 0.0) + len(present)
        u, t = result.update, result.timings
        sums |= {"u:samples": u.samples, "u:steps": u.optimizer_steps, "u:terms": u.terms, "u:grad_norm": u.grad_norm}
        sums |= {f"term:{name}": value for name, value in u.term_sums().items()}
        sums |= {"t:sampling": t.sampling, "t:reward_wait": t.reward_wait, "t:training": t.training}
        for name in self.dimensions:
            sums.setdefault(f"{name}:sum", 0.0)
            sums.setdefault(f"{name}:n", 0.0)
        return sums

    def figures(self, result: StepResult) -> dict[str, float]:
        """The step's figures over all ranks: counts and sums added up, times averaged."""
        device, world = self.generator.device, self.ranks.world
        s = sum_across(self._sums(result), self.ranks, device)
        maxima = result.update.term_maxima()
        largest = max_across(maxima, self.ranks, device) if maxima else {}
        n, mean = s["r_n"], s["r"] / max(s["r_n"], 1)
        term_sums = {k.removeprefix("term:"): v for k, v in s.items() if k.startswith("term:")}
        update = update_figures(
            term_sums, largest, s["u:samples"], int(s["u:steps"] / world), s["u:terms"], s["u:grad_norm"] / world
        )
        figures = {
            "reward/mean": mean if n else math.nan,
            "reward/std": std_of_sums(n, s["r"], s["r2"]),
            "reward/failed_fraction": s["failed"] / max(s["items"], 1),
            "reward/scored": n,
            "groups/zero_spread": s["zero_spread"],
            "groups/total": s["groups"],
        }
        for name in self.dimensions:
            figures[f"reward/{name}"] = s[f"{name}:sum"] / s[f"{name}:n"] if s[f"{name}:n"] else math.nan
        figures |= update
        times = {k: s[f"t:{k}"] / world for k in ("sampling", "reward_wait", "training")}
        figures |= {f"time/{k}_s": v for k, v in times.items()}
        wall = sum(times.values())
        figures["time/reward_wait_fraction"] = times["reward_wait"] / wall if wall else math.nan
        return figures

    # ------------------------------------------------------------------ the run

    def run(self) -> list[dict[str, float]]:
        """Train for `steps` steps. A step whose rewards failed still trains on those that came back;
        after `max_failed_steps` consecutive steps without any reward on any rank, save and stop."""
        s = self.settings
        history = []
        without_rewards = 0
        bar = tqdm(
            range(1, s.steps + 1), desc="firm-rollout", disable=not (s.progress and self.ranks.main), unit="step"
        )
        for number in bar:
            figures = self.step().figures
            if s.eval_every and number % s.eval_every == 0:
                figures["eval/reward_mean"] = self.evaluate()
            history.append(figures)
            bar.set_postfix(reward=f"{figures['reward/mean']:.3f}", wait=f"{figures['time/reward_wait_fraction']:.0%}")
            # the figures are reduced over all ranks, so every rank takes the same branch below
            without_rewards = without_rewards + 1 if figures["reward/scored"] == 0 else 0
            if self.ranks.main:
                if figures["reward/failed_fraction"] > 0:
                    log.warning("step %d: %.0f%% of rewards failed", number, 100 * figures["reward/failed_fraction"])
                if self.metrics is not None:
                    self.metrics.write(number, figures)
                stopping = without_rewards >= s.max_failed_steps
                if (s.save_every and number % s.save_every == 0) or number == s.steps or stopping:
                    self.save(number)
            if without_rewards >= s.max_failed_steps:
                raise StoppedWithoutRewards(
                    f"no reward came back for {without_rewards} consecutive steps (--max-failed-steps), so the "
                    f"run stopped after step {number}; the LoRA weights are in "
                    f"{s.output_dir / f'checkpoint-{number}'}. Check the reward server and its /metrics."
                )
        return history

    def save(self, step: int) -> None:
        path = self.settings.output_dir / f"checkpoint-{step}"
        settings: dict[str, Any] = self.settings.model_dump(mode="json")
        with self._kept_weights():
            save_lora(self.generator.pipeline, path, settings, step)
        kept = "the EMA of the LoRA weights" if self.ema is not None else "LoRA weights"
        log.info("saved %s of step %d to %s", kept, step, path)
