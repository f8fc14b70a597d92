"""The one interface every image generator offers the rollout loop.

A generator turns a condition (a prompt, or a source image and an instruction) into conditioning
tensors and starting noise, predicts the flow velocity (classifier-free guidance included), gives
its noise schedule and decodes latents to images. The sampler, the rewards and the update know
nothing else about the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class Condition:
    """What one GRPO group is sampled for."""

    prompt: str  # the text prompt (T2I) or the edit instruction
    source: Image.Image | None = None  # the image to edit (editing only)
    id: str = ""


@dataclass
class Conditioning:
    """Per-row conditioning tensors (row i belongs to sample i), sliced together for micro-batches,
    and what the whole group shares (`group`: sizes, the source image as the generator saw it)."""

    tensors: dict[str, torch.Tensor | None]
    group: dict[str, Any] = field(default_factory=dict)

    def rows(self, index: torch.Tensor | slice) -> Conditioning:
        return Conditioning({k: None if v is None else v[index] for k, v in self.tensors.items()}, self.group)


class Generator(ABC):
    """A flow-matching image generator with a trainable `transformer`."""

    pipeline: Any  # the diffusers pipeline (its components, and where LoRA weights are saved from)
    transformer: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    cfg_grad: str = "cond"  # "cond": the unconditional CFG branch carries no gradient (Flow-GRPO); "both"

    @property
    def uncond_without_grad(self) -> bool:
        """Whether the unconditional prediction carries no gradient: always when sampling, and in the
        update unless `cfg_grad` is "both"."""
        return not torch.is_grad_enabled() or self.cfg_grad == "cond"

    @abstractmethod
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        """Conditioning for `n` samples of `condition` and their starting noise."""

    @abstractmethod
    def schedule(self, steps: int, latents: torch.Tensor) -> tuple[list[float], list[float]]:
        """(sigmas: steps + 1 noise levels from ~1 down to 0, timesteps: the model's time input per step)."""

    @abstractmethod
    def velocity(self, latents: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
        """The guided velocity prediction for `latents` at `timestep`."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> list[Image.Image]:
        """Images from final latents."""


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional prediction towards the conditional one."""
    return uncond + scale * (cond - uncond)
