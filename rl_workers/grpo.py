"""The clipped GRPO objective on recorded denoising transitions.

Each sample's trajectory is a chain of Gaussian steps whose log-probabilities were recorded at
sampling. The update recomputes them under the current policy for a random subset of steps and
applies the PPO-style clipped surrogate with the sample's group-normalised advantage, plus an
optional KL to the frozen reference (the model with LoRA off). Samples masked out (no reward, or a
zero-spread group) are never forwarded, so they contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rl_workers.advantages import GroupAdvantages
from rl_workers.generators.base import Condition, Conditioning, Generator
from rl_workers.lora import reference_policy
from rl_workers.rewards import GroupRewards, PendingRewards
from rl_workers.sampling import Trajectory, step_log_prob


@dataclass
class Rollout:
    """One sampled GRPO group and, once scored, its rewards and advantages."""

    condition: Condition
    conditioning: Conditioning
    trajectory: Trajectory
    pending: PendingRewards | None = None
    rewards: GroupRewards | None = None
    advantages: GroupAdvantages | None = None


@dataclass
class UpdateStats:
    samples: int = 0  # samples that trained
    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    max_ratio_deviation: float = 0.0  # max |ratio - 1|: 0 for the unchanged policy
    grad_norm: float = 0.0
    terms: int = field(default=0, repr=False)


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


def training_steps(steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """Which denoising steps train this update: a random subset of round(fraction * steps), at least one."""
    count = max(1, round(fraction * steps))
    return sorted(torch.randperm(steps, generator=generator)[:count].tolist())


def accumulate_gradients(
    model: Generator,
    rollouts: Sequence[Rollout],
    *,
    step_indices: Sequence[int],
    noise_level: float,
    clip_range: float,
    kl_beta: float,
    batch_size: int,
) -> UpdateStats:
    """Backpropagate the loss of every trainable sample (gradients add up over micro-batches and steps)."""
    stats = UpdateStats()
    total = sum(int(r.advantages.mask.sum()) for r in rollouts if r.advantages is not None)
    stats.samples = total
    if total == 0:
        return stats
    norm = total * len(step_indices)
    for rollout in rollouts:
        assert rollout.advantages is not None
        device = rollout.trajectory.latents.device
        rows = torch.nonzero(rollout.advantages.mask).flatten().to(device)
        for chunk in torch.split(rows, batch_size):
            adv = rollout.advantages.advantages.to(device)[chunk]
            for j in step_indices:
                step = step_log_prob(model, rollout.conditioning, rollout.trajectory, chunk, j, noise_level=noise_level)
                old = rollout.trajectory.log_probs[chunk, j]
                policy, ratio, clipped = clipped_surrogate(step.log_prob, old, adv, clip_range)
                loss = policy
                kl = torch.zeros_like(policy)
                if kl_beta > 0:
                    with torch.no_grad(), reference_policy(model.transformer):
                        ref = step_log_prob(
                            model, rollout.conditioning, rollout.trajectory, chunk, j, noise_level=noise_level
                        )
                    kl = ((step.mean - ref.mean) ** 2).flatten(1).mean(dim=1) / (2.0 * step.scale**2)
                    loss = policy + kl_beta * kl
                (loss.sum() / norm).backward()
                stats.loss += float(loss.detach().sum()) / norm
                stats.policy_loss += float(policy.detach().sum()) / norm
                stats.kl += float(kl.detach().sum()) / norm
                stats.clip_fraction += float(clipped.float().sum()) / norm
                stats.max_ratio_deviation = max(stats.max_ratio_deviation, float((ratio.detach() - 1).abs().max()))
    return stats
