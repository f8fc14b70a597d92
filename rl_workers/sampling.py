"""Flow-matching sampling with a log-probability per denoising step.

A flow-matching model predicts a velocity v; its ODE step x' = x + v * dt is deterministic and has
no likelihood. The SDE with the same marginals adds Gaussian noise at every step, so each step is a
Gaussian transition N(mean, scale^2) whose log-density is what a policy gradient needs (the
Flow-GRPO formulation). `noise_level` scales that noise; the ODE sampler (`sde=False`) is for
evaluation. Log-probabilities are the mean log-density per latent element, so their scale does not
grow with the image size.

Trajectory latents stay in float32 and are cast to the model's dtype only as its input: the last
steps' noise is a few thousandths, below bfloat16's resolution for latents of size 1-3, so rounded
latents would add noise of their own to every recomputed log-probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rl_workers.generators.base import Conditioning, Generator


@dataclass(frozen=True)
class Transition:
    next_latents: torch.Tensor
    log_prob: torch.Tensor  # (batch,) float32
    mean: torch.Tensor
    scale: float  # standard deviation of the step's Gaussian: std * sqrt(|dt|)
    std: float  # the SDE's noise level at this step, before the step size (Flow-GRPO's std_dev_t)


def per_row_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first: one value per sample of a batch."""
    return values.flatten(1).mean(dim=1)


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    noise_level: float,
    sigma_cap: float,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Transition:
    """One SDE step from noise level `sigma` to `sigma_next` (< sigma).

    With `next_latents` given, nothing is sampled: the log-probability of that recorded step under
    this velocity is returned (what the update recomputes). `sigma_cap` replaces sigma = 1, where
    the noise schedule divides by zero (the first sigma below 1 is the usual choice). The step is
    computed and returned in float32, whatever the inputs' dtype.

    >>> x = torch.zeros(2, 4); v = torch.ones(2, 4)
    >>> step = sde_step(x, v, 1.0, 0.5, noise_level=0.7, sigma_cap=0.5, generator=torch.Generator().manual_seed(0))
    >>> again = sde_step(x, v, 1.0, 0.5, noise_level=0.7, sigma_cap=0.5, next_latents=step.next_latents)
    >>> bool(torch.allclose(step.log_prob, again.log_prob))
    True
    """
    x = latents.float()
    v = velocity.float()
    dt = sigma_next - sigma
    std = noise_level * math.sqrt(sigma / (1.0 - (sigma_cap if sigma >= 1.0 else sigma)))
    mean = x * (1.0 + std**2 / (2.0 * sigma) * dt) + v * (1.0 + std**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    if next_latents is None:
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device)
        next_latents = mean + scale * noise
    sample = next_latents.detach().float()
    log_density = -((sample - mean) ** 2) / (2.0 * scale**2) - math.log(scale) - 0.5 * math.log(2.0 * math.pi)
    return Transition(sample, per_row_mean(log_density), mean, scale, std)


def kl_to_reference(step: Transition, reference: Transition, form: str) -> torch.Tensor:
    """Per-sample KL term between this policy's step and the reference's, per latent element.

    "exact" is the KL of the two Gaussians, |mean - ref|^2 / (2 scale^2) with scale^2 = std^2 |dt|.
    "flow_grpo" divides by 2 std^2 instead (Flow-GRPO's form, which its beta values assume): |dt|
    times the exact KL, so small steps (the last ones) weigh far less.

    >>> a = Transition(torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), scale=0.5, std=1.0)
    >>> b = Transition(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), scale=0.5, std=1.0)
    >>> kl_to_reference(a, b, "exact").tolist(), kl_to_reference(a, b, "flow_grpo").tolist()
    ([2.0], [0.5])
    """
    if form not in ("exact", "flow_grpo"):
        raise ValueError(f"unknown KL form {form!r}")
    squared = per_row_mean((step.mean - reference.mean) ** 2)
    return squared / (2.0 * (step.scale if form == "exact" else step.std) ** 2)


def ode_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The deterministic Euler step of the flow ODE (evaluation sampling)."""
    return latents.float() + velocity.float() * (sigma_next - sigma)


def sigma_cap_of(sigmas: list[float]) -> float:
    """What replaces sigma = 1 in the noise schedule (where it divides by zero): the first sigma below 1."""
    return sigmas[1] if len(sigmas) > 1 and sigmas[1] < 1.0 else 0.999


@dataclass
class Trajectory:
    """Everything the update needs from one batch of rollouts."""

    latents: torch.Tensor  # (batch, steps + 1, ...) float32: x_T ... x_0
    log_probs: torch.Tensor  # (batch, steps) float32; zeros for ODE sampling
    sigmas: list[float]  # steps + 1 noise levels
    timesteps: list[float]  # steps model timesteps

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@torch.no_grad()
def sample(
    model: Generator,
    conditioning: Conditioning,
    latents: torch.Tensor,
    *,
    steps: int,
    noise_level: float,
    sde: bool = True,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Denoise `latents` in `steps` steps, recording each step's latents (float32) and log-probability."""
    sigmas, timesteps = model.schedule(steps, latents)
    cap = sigma_cap_of(sigmas)
    x = latents.float()
    path = [x]
    log_probs = []
    for i, t in enumerate(timesteps):
        v = model.velocity(x.to(model.dtype), t, conditioning)
        if sde:
            step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level=noise_level, sigma_cap=cap, generator=generator)
            x, log_prob = step.next_latents, step.log_prob
        else:
            x, log_prob = ode_step(x, v, sigmas[i], sigmas[i + 1]), torch.zeros(x.shape[0], device=x.device)
        path.append(x)
        log_probs.append(log_prob)
    return Trajectory(
        latents=torch.stack(path, dim=1), log_probs=torch.stack(log_probs, dim=1), sigmas=sigmas, timesteps=timesteps
    )


def step_log_prob(
    model: Generator,
    conditioning: Conditioning,
    trajectory: Trajectory,
    rows: torch.Tensor | slice,
    index: int,
    *,
    noise_level: float,
) -> Transition:
    """The log-probability of the recorded step `index` of `rows` under the model as it is now (with grad)."""
    sigmas = trajectory.sigmas
    x = trajectory.latents[rows, index]
    v = model.velocity(x.to(model.dtype), trajectory.timesteps[index], conditioning.rows(rows))
    return sde_step(
        x,
        v,
        sigmas[index],
        sigmas[index + 1],
        noise_level=noise_level,
        sigma_cap=sigma_cap_of(sigmas),
        next_latents=trajectory.latents[rows, index + 1],
    )
