"""The deterministic multistep DPM-Solver++ (2nd order) for flow matching: NFT's training sampler.

With x = (1 - sigma) x0 + sigma noise, the model's velocity v gives the clean estimate
x0 = x - sigma v. The first and the last step are DDIM steps without noise (the last lands on that
estimate); every step between is the second-order multistep update in lambda = log((1 - sigma) / sigma),
from this step's estimate and the previous one's. This is the release's `solver="dpm2"` with
`deterministic=True`. Nothing is random and no log-probability is recorded: NFT trains on the
clean samples, not on the path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rl_workers.sampling import Trajectory

if TYPE_CHECKING:
    from rl_workers.generators.base import Conditioning, Generator


def _lambda(sigma: float) -> float:
    """log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma = 1 (pure noise)."""
    return -math.inf if sigma >= 1.0 else math.log(1.0 - sigma) - math.log(sigma)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The noise-free DDIM step: keep the implied noise, move to `sigma_next`.

    >>> x0 = torch.ones(1); ddim_step(0.5 * x0 + 0.5 * torch.zeros(1), x0, 0.5, 0.0).tolist()
    [1.0]
    """
    noise = (x - (1.0 - sigma) * x0) / sigma
    return (1.0 - sigma_next) * x0 + sigma_next * noise


def dpm2_step(
    x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor, sigmas: tuple[float, float, float]
) -> torch.Tensor:
    """The second-order multistep update from sigmas (previous, current, next) and their x0 estimates.

    Coming from sigma = 1, the previous lambda is -inf, the correction term vanishes and the update is
    DPM-Solver++'s first-order one.
    """
    sigma_prev, sigma, sigma_next = sigmas
    lam_next, lam, lam_prev = _lambda(sigma_next), _lambda(sigma), _lambda(sigma_prev)
    h = lam_next - lam
    scale = (1.0 - sigma_next) * math.expm1(-h)  # alpha_next (e^-h - 1)
    d1 = torch.zeros_like(x0) if math.isinf(lam_prev) else (x0 - previous_x0) * (h / (lam - lam_prev))
    return (sigma_next / sigma) * x - scale * x0 - 0.5 * scale * d1


@torch.no_grad()
def sample_dpm2(model: Generator, conditioning: Conditioning, latents: torch.Tensor, *, steps: int) -> Trajectory:
    """Denoise `latents` in `steps` deterministic steps, recording each step's latents (float32)."""
    sigmas, timesteps = model.schedule(steps, latents)
    x = latents.float()
    path = [x]
    previous_x0 = x
    for i, t in enumerate(timesteps):
        v = model.velocity(x.to(model.dtype), t, conditioning).float()
        x0 = x - sigmas[i] * v
        if i == 0 or i == len(timesteps) - 1:
            x = ddim_step(x, x0, sigmas[i], sigmas[i + 1])
        else:
            x = dpm2_step(x, x0, previous_x0, (sigmas[i - 1], sigmas[i], sigmas[i + 1]))
        previous_x0 = x0
        path.append(x)
    return Trajectory(
        latents=torch.stack(path, dim=1),
        log_probs=torch.zeros(x.shape[0], len(timesteps), device=x.device),
        sigmas=sigmas,
        timesteps=timesteps,
    )
