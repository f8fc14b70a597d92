"""What a training algorithm supplies to the rollout worker: how a training group is sampled, which
samples train, and the loss whose gradients they accumulate.

Everything else is the worker's and shared by every algorithm: generators, reward calls overlapped
with sampling, advantages, masking of unscored samples, mini-batches, gradient averaging over
ranks, the EMA, checkpoints and the logged figures. An algorithm's update adds its per-term sums to
a `TrainingStats`, and the worker reduces them over ranks and logs them as `train/<name>`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from rl_workers.advantages import GroupAdvantages
from rl_workers.generators.base import Condition, Conditioning, Generator
from rl_workers.rewards import GroupRewards, PendingRewards
from rl_workers.sampling import Trajectory

if TYPE_CHECKING:
    from rl_workers.settings import RolloutSettings


@dataclass
class Rollout:
    """One sampled group and, once scored, its rewards and advantages."""

    condition: Condition
    conditioning: Conditioning
    trajectory: Trajectory
    pending: PendingRewards | None = None
    rewards: GroupRewards | None = None
    advantages: GroupAdvantages | None = None


@dataclass
class TrainingStats:
    """Counts of an update; an algorithm's subclass adds the sums of its loss terms (`term_sums`, logged
    as their mean over the update's terms) and its largest values (`term_maxima`, logged as they are)."""

    samples: int = 0  # samples that trained
    optimizer_steps: int = 0
    terms: int = 0  # (sample, denoising step) terms
    loss: float = 0.0
    grad_norm: float = 0.0  # summed over optimizer steps

    def term_sums(self) -> dict[str, float]:
        return {"loss": self.loss}

    def term_maxima(self) -> dict[str, float]:
        return {}


def update_figures(
    sums: dict[str, float], maxima: dict[str, float], samples: float, optimizer_steps: float, terms: float, grad: float
) -> dict[str, float]:
    """The update's logged figures. Means are NaN when nothing trained, so an empty update never reads
    as a calm one."""
    figures = {f"train/{name}": total / (terms or math.nan) for name, total in sums.items()}
    figures |= {f"train/{name}": value if terms else math.nan for name, value in maxima.items()}
    figures["train/grad_norm"] = grad / (optimizer_steps or math.nan)
    figures["train/samples"] = float(samples)
    figures["train/optimizer_steps"] = float(optimizer_steps)
    return figures


@dataclass(frozen=True)
class MicroBatch:
    """Some trainable samples of one rollout, on its device, with their advantages."""

    rollout: Rollout
    rows: torch.Tensor
    advantages: torch.Tensor


def micro_batches(rollouts: Sequence[Rollout], rows: Sequence[torch.Tensor], size: int) -> Iterator[MicroBatch]:
    """Rollout `i`'s samples `rows[i]` in micro-batches of at most `size`; a rollout with none is skipped,
    never forwarded."""
    for rollout, selected in zip(rollouts, rows, strict=True):
        if len(selected) == 0:
            continue
        assert rollout.advantages is not None
        device = rollout.trajectory.latents.device
        selected = selected.to(device)
        for chunk in torch.split(selected, size):
            yield MicroBatch(rollout, chunk, rollout.advantages.advantages.to(device)[chunk])


class Algorithm(ABC):
    """The parts of training that differ between algorithms. `params` are the trained LoRA weights."""

    name: ClassVar[str]

    def __init__(self, generator: Generator, params: Sequence[torch.nn.Parameter], seed: int) -> None:
        self.generator = generator
        self.params = list(params)
        self.rng = torch.Generator().manual_seed(seed + 20_000)  # the update's own draws (noise, timesteps)

    @abstractmethod
    def sample(
        self, settings: RolloutSettings, conditioning: Conditioning, latents: torch.Tensor, rng: torch.Generator
    ) -> Trajectory:
        """A training group's trajectory from `latents`, with what the update needs from it."""

    def trainable(self, settings: RolloutSettings, rollout: Rollout) -> torch.Tensor:
        """Which samples of a scored group train (bool, one per sample). Never an unscored one; a group
        whose rewards are all equal (advantages 0) only with `train_tied_groups`."""
        assert rollout.advantages is not None and rollout.rewards is not None
        if rollout.advantages.zero_spread and settings.train_tied_groups:
            return torch.tensor([r is not None for r in rollout.rewards.rewards])
        return rollout.advantages.mask

    @abstractmethod
    def new_stats(self) -> TrainingStats:
        """Empty figures of one update."""

    @abstractmethod
    def accumulate(
        self,
        settings: RolloutSettings,
        rollouts: Sequence[Rollout],
        rows: Sequence[torch.Tensor],
        stats: TrainingStats,
        *,
        norm: float,
    ) -> None:
        """Backpropagate the loss of samples `rows[i]` of `rollouts[i]`, divided by `norm` (gradients add up
        over micro-batches and denoising steps), and add its loss figures to `stats` (the worker counts the
        samples and optimizer steps)."""

    def after_step(self, settings: RolloutSettings, optimizer_steps: int) -> dict[str, float]:
        """Called once per training step, after its update, with the run's optimizer steps so far; returns
        figures that are the same on every rank."""
        return {}
