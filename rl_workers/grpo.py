"""The clipped GRPO objective on recorded denoising transitions.

Each sample's trajectory is a chain of Gaussian steps whose log-probabilities were recorded at
sampling. The update recomputes them under the current policy for the first steps of the chain and
applies the PPO-style clipped surrogate with the sample's group-normalised advantage, plus an
optional KL to the frozen reference (the model with LoRA off). The trainable samples of a step are
split into mini-batches with one optimizer step each, so after the first the policy has moved
and the clip bounds how far. Samples masked out (no reward, or a zero-spread group) are never
forwarded, so they contribute nothing. `GRPO` is this objective and its SDE sampler behind the
worker's algorithm interface (`rl_workers.algorithm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rl_workers.algorithm import Algorithm, Rollout, TrainingStats, micro_batches
from rl_workers.generators.base import Conditioning, Generator
from rl_workers.lora import reference_policy
from rl_workers.sampling import Trajectory, kl_to_reference, sample, step_log_prob

if TYPE_CHECKING:
    from rl_workers.settings import RolloutSettings


@dataclass
class UpdateStats(TrainingStats):
    """Sums over the (sample, denoising step) terms of a GRPO update; `update_figures` turns them into the logged
    figures."""

    policy_loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    max_ratio_deviation: float = 0.0  # max |ratio - 1|: 0 for the policy that sampled

    def term_sums(self) -> dict[str, float]:
        return {"loss": self.loss, "policy_loss": self.policy_loss, "kl": self.kl, "clip_fraction": self.clipped}

    def term_maxima(self) -> dict[str, float]:
        return {"max_ratio_deviation": self.max_ratio_deviation}


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample PPO loss max(-A r, -A clip(r)), the ratio r, and whether clipping was active.

    >>> loss, ratio, clipped = clipped_surrogate(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.1)
    >>> loss.tolist(), ratio.tolist(), clipped.tolist()
    ([-1.0, 1.0], [1.0, 1.0], [False, False])
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, (torch.abs(ratio - 1.0) > clip_range)


def training_steps(steps: int, fraction: float) -> list[int]:
    """Which denoising steps train: the first int(fraction * steps), at least one (Flow-GRPO's rule).

    The last steps barely move the image and their noise is tiny, so their ratios are the noisiest;
    a fraction below 1 leaves them out.

    >>> training_steps(10, 0.99), training_steps(10, 1.0)[-1], training_steps(10, 0.3), training_steps(10, 0.01)
    ([0, 1, 2, 3, 4, 5, 6, 7, 8], 9, [0, 1, 2], [0])
    """
    return list(range(max(1, int(fraction * steps))))


def accumulate_gradients(
    model: Generator,
    rollouts: Sequence[Rollout],
    rows: Sequence[torch.Tensor],
    stats: UpdateStats,
    *,
    step_indices: Sequence[int],
    noise_level: float,
    clip_range: float,
    kl_beta: float,
    batch_size: int,
    norm: float,
    kl_form: str = "flow_grpo",
) -> None:
    """Backpropagate the loss of samples `rows[i]` of `rollouts[i]` at `step_indices`, divided by `norm`
    (gradients add up over micro-batches and steps); add the figures to `stats`."""
    for batch in micro_batches(rollouts, rows, batch_size):
        rollout, chunk = batch.rollout, batch.rows
        for j in step_indices:
            step = step_log_prob(model, rollout.conditioning, rollout.trajectory, chunk, j, noise_level=noise_level)
            policy, ratio, clipped = clipped_surrogate(
                step.log_prob, rollout.trajectory.log_probs[chunk, j], batch.advantages, clip_range
            )
            kl = torch.zeros_like(policy)
            if kl_beta > 0:
                with torch.no_grad(), reference_policy(model.transformer):
                    ref = step_log_prob(
                        model, rollout.conditioning, rollout.trajectory, chunk, j, noise_level=noise_level
                    )
                kl = kl_to_reference(step, ref, kl_form)
            loss = policy + kl_beta * kl
            (loss.sum() / norm).backward()
            stats.terms += len(chunk)
            stats.loss += float(loss.detach().sum())
            stats.policy_loss += float(policy.detach().sum())
            stats.kl += float(kl.detach().sum())
            stats.clipped += float(clipped.float().sum())
            stats.max_ratio_deviation = max(stats.max_ratio_deviation, float((ratio.detach() - 1).abs().max()))


class GRPO(Algorithm):
    """Flow-GRPO: SDE sampling with recorded log-probabilities, the clipped surrogate on the first steps."""

    name = "grpo"

    def sample(
        self, settings: RolloutSettings, conditioning: Conditioning, latents: torch.Tensor, rng: torch.Generator
    ) -> Trajectory:
        assert settings.sample_steps is not None
        return sample(
            self.generator,
            conditioning,
            latents,
            steps=settings.sample_steps,
            noise_level=settings.noise_level,
            generator=rng,
        )

    def new_stats(self) -> UpdateStats:
        return UpdateStats()

    def accumulate(
        self,
        settings: RolloutSettings,
        rollouts: Sequence[Rollout],
        rows: Sequence[torch.Tensor],
        stats: TrainingStats,
        *,
        norm: float,
    ) -> None:
        assert isinstance(stats, UpdateStats) and settings.kl_beta is not None
        accumulate_gradients(
            self.generator,
            rollouts,
            rows,
            stats,
            step_indices=training_steps(rollouts[0].trajectory.steps, settings.timestep_fraction),
            noise_level=settings.noise_level,
            clip_range=settings.clip_range,
            kl_beta=settings.kl_beta,
            kl_form=settings.kl_form,
            batch_size=settings.batch_size,
            norm=norm,
        )
