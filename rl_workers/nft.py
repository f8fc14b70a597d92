"""DiffusionNFT, the FIRM release's RL recipe, behind the worker's algorithm interface.

Groups are sampled deterministically (dpm2, no CFG by default) by an "old" adapter that trails the
trained one; only the clean samples x0 and the sampling timesteps are kept. The update noises each
x0 afresh at a stored timestep, x_t = (1 - t) x0 + t noise, and predicts the velocity with the
trained adapter (v), the old one (v_old, no gradient) and the reference (adapters off, no gradient).
Two implicit policies mix v and v_old: the positive beta v + (1 - beta) v_old and the negative
(1 + beta) v_old - beta v. Each gives an x0 estimate whose squared error to x0 is divided by its own
detached mean absolute error. The advantage A sets how the two errors weigh:
r = clamp(clip(A, +-c) / c / 2 + 1/2, 0, 1), policy loss = (r L+ / beta + (1 - r) L- / beta) c, so a
high advantage pulls v's x0 estimate toward x0 and a low one pushes it away; plus kl_beta times
the mean squared distance of v to the reference. After each training step the old adapter is
blended toward the trained one, old = d old + (1 - d) trained, on the release's schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rl_workers.algorithm import Algorithm, Rollout, TrainingStats, micro_batches
from rl_workers.dpm_solver import sample_dpm2
from rl_workers.generators.base import Conditioning, Generator
from rl_workers.grpo import training_steps
from rl_workers.lora import reference_policy
from rl_workers.sampling import Trajectory, per_row_mean
from rl_workers.shadow_weights import ShadowWeights

if TYPE_CHECKING:
    from rl_workers.settings import RolloutSettings

# The release's return_decay presets (decay_type): (flat steps, rate per optimizer step, ceiling).
OLD_DECAY_SCHEDULES: dict[int, tuple[int, float, float]] = {
    0: (0, 0.0, 0.0),
    1: (0, 0.001, 0.5),
    2: (75, 0.0075, 0.999),
}
WEIGHT_FLOOR = 1e-5  # the adaptive weight (mean absolute x0 error) never falls below this


def old_decay(optimizer_steps: int, decay_type: int) -> float:
    """How much of the old adapter stays at a blend, after `optimizer_steps` steps: 0 for the first
    `flat` steps, then rate * (steps - flat) up to the ceiling.

    >>> old_decay(0, 1), old_decay(100, 1), old_decay(2000, 1), old_decay(50, 2), old_decay(175, 2)
    (0.0, 0.1, 0.5, 0.0, 0.75)
    """
    flat, rate, ceiling = OLD_DECAY_SCHEDULES[decay_type]
    return 0.0 if optimizer_steps < flat else min((optimizer_steps - flat) * rate, ceiling)


@dataclass(frozen=True)
class NFTTerms:
    """Per-sample values of one denoising step's loss."""

    loss: torch.Tensor  # policy + kl_beta * kl, with grad
    policy: torch.Tensor
    positive: torch.Tensor  # L+: the positive policy's weighted x0 error
    negative: torch.Tensor  # L-: the negative policy's
    kl: torch.Tensor  # mean (v - v_ref)^2
    old_deviation: torch.Tensor  # mean (v - v_old)^2: how far the trained prediction is from the sampler's


def _weighted_error(x0_estimate: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Squared error over its own detached mean absolute error (per sample): every sample's error counts
    about alike, however noisy its timestep."""
    with torch.no_grad():
        weight = per_row_mean((x0_estimate.double() - x0.double()).abs()).clamp(min=WEIGHT_FLOOR)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return per_row_mean((x0_estimate - x0) ** 2 / weight.view(shape).to(x0.dtype))


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor | float,
    advantages: torch.Tensor,
    *,
    beta: float,
    adv_clip: float,
    kl_beta: float,
) -> NFTTerms:
    """The NFT loss of one denoising step, per sample (float32 in, float32 out; `sigma` broadcasts).

    >>> x0, noise = torch.zeros(1, 2), torch.ones(1, 2)
    >>> x_t = 0.5 * x0 + 0.5 * noise; v = noise - x0  # the exact velocity: x0 is estimated exactly
    >>> nft_loss(v, v, None, x_t, x0, 0.5, torch.ones(1), beta=1.0, adv_clip=5.0, kl_beta=0.0).policy.tolist()
    [0.0]
    """
    old = v_old.detach()
    positive = _weighted_error(x_t - sigma * (beta * v + (1.0 - beta) * old), x0)
    negative = _weighted_error(x_t - sigma * ((1.0 + beta) * old - beta * v), x0)
    r = ((advantages.clamp(-adv_clip, adv_clip) / adv_clip) / 2.0 + 0.5).clamp(0.0, 1.0)
    policy = (r * positive / beta + (1.0 - r) * negative / beta) * adv_clip
    kl = per_row_mean((v - v_ref.detach()) ** 2) if v_ref is not None else torch.zeros_like(policy)
    with torch.no_grad():
        deviation = per_row_mean((v - old) ** 2)
    return NFTTerms(policy + kl_beta * kl, policy, positive.detach(), negative.detach(), kl.detach(), deviation)


@dataclass
class NFTStats(TrainingStats):
    """Sums over the (sample, denoising step) terms of an NFT update."""

    policy_loss: float = 0.0
    positive_loss: float = 0.0
    negative_loss: float = 0.0
    kl: float = 0.0
    old_deviation: float = 0.0

    def add(self, terms: NFTTerms) -> None:
        self.terms += len(terms.loss)
        for name, values in (
            ("loss", terms.loss), ("policy_loss", terms.policy), ("positive_loss", terms.positive),
            ("negative_loss", terms.negative), ("kl", terms.kl), ("old_deviation", terms.old_deviation),
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + float(values.detach().sum()))

    def term_sums(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "policy_loss": self.policy_loss,
            "positive_loss": self.positive_loss,
            "negative_loss": self.negative_loss,
            "kl": self.kl,
            "old_deviation": self.old_deviation,
        }


class NFT(Algorithm):
    """DiffusionNFT with an old adapter that samples and trails the trained one."""

    name = "nft"

    def __init__(self, generator: Generator, params: Sequence[torch.nn.Parameter], seed: int) -> None:
        super().__init__(generator, params, seed)
        self.old = ShadowWeights(self.params)  # starts as the trained adapter, as in the release

    def sample(
        self, settings: RolloutSettings, conditioning: Conditioning, latents: torch.Tensor, rng: torch.Generator
    ) -> Trajectory:
        assert settings.sample_steps is not None
        with self.old.applied(self.params):
            return sample_dpm2(self.generator, conditioning, latents, steps=settings.sample_steps)

    def new_stats(self) -> NFTStats:
        return NFTStats()

    def _velocities(
        self, x_t: torch.Tensor, timestep: float, conditioning: Conditioning, reference: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """v (with grad), v_old and v_ref (none when the KL is off), in float32."""
        model, x = self.generator, x_t.to(self.generator.dtype)
        with torch.no_grad(), self.old.applied(self.params):
            v_old = model.velocity(x, timestep, conditioning).float()
        v = model.velocity(x, timestep, conditioning).float()
        v_ref = None
        if reference:
            with torch.no_grad(), reference_policy(model.transformer):
                v_ref = model.velocity(x, timestep, conditioning).float()
        return v, v_old, v_ref

    def accumulate(
        self,
        settings: RolloutSettings,
        rollouts: Sequence[Rollout],
        rows: Sequence[torch.Tensor],
        stats: TrainingStats,
        *,
        norm: float,
    ) -> None:
        """Each micro-batch trains on `int(timestep_fraction * steps)` of its stored timesteps, drawn at
        random (the release draws them per sample; here a micro-batch shares its draw)."""
        assert isinstance(stats, NFTStats) and settings.kl_beta is not None
        for batch in micro_batches(rollouts, rows, settings.batch_size):
            trajectory, chunk = batch.rollout.trajectory, batch.rows
            x0 = trajectory.latents[chunk, -1]
            conditioning = batch.rollout.conditioning.rows(chunk)
            count = len(training_steps(trajectory.steps, settings.timestep_fraction))
            for j in torch.randperm(trajectory.steps, generator=self.rng)[:count].tolist():
                sigma = trajectory.sigmas[j]
                noise = torch.randn(x0.shape, generator=self.rng, dtype=torch.float32).to(x0.device)
                x_t = (1.0 - sigma) * x0 + sigma * noise
                v, v_old, v_ref = self._velocities(x_t, trajectory.timesteps[j], conditioning, settings.kl_beta > 0)
                terms = nft_loss(
                    v, v_old, v_ref, x_t, x0, sigma, batch.advantages,
                    beta=settings.nft_beta, adv_clip=settings.adv_clip, kl_beta=settings.kl_beta,
                )  # fmt: skip
                (terms.loss.sum() / norm).backward()
                stats.add(terms)

    def after_step(self, settings: RolloutSettings, optimizer_steps: int) -> dict[str, float]:
        """Blend the old adapter toward the trained one, as the release does after each epoch."""
        decay = old_decay(optimizer_steps, settings.old_decay_type)
        self.old.blend(self.params, decay)
        return {"train/old_decay": decay, "train/old_adapter_distance": self.old.distance(self.params)}
