"""Qwen-Image-Edit (instruction editing) behind the generator interface, on diffusers' components.

The source image is resized to the training resolution, encoded once by the VAE per group, and
concatenated to the noisy latents at every step, as the diffusers pipeline does; the text encoder
sees the source image and the instruction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from rl_workers.generators.base import Condition, Conditioning, Generator, cfg_combine


class QwenEditGenerator(Generator):
    task = "edit"

    def __init__(self, pipeline: Any, *, resolution: int, guidance_scale: float, negative_prompt: str = " ") -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.resolution = resolution
        self.guidance_scale = guidance_scale  # Qwen's "true" CFG, with the norm rescale of the pipeline
        self.negative_prompt = negative_prompt
        factor = pipeline.vae_scale_factor
        side = resolution // factor // 2
        self._img_shapes = [(1, side, side), (1, side, side)]

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        if condition.source is None:
            raise ValueError(f"editing needs a source image (condition {condition.id!r} has none)")
        pipe = self.pipeline
        side = self.resolution
        source = condition.source.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        embeds, mask = pipe.encode_prompt(
            prompt=condition.prompt, image=[source], device=self.device, num_images_per_prompt=n
        )
        tensors: dict[str, torch.Tensor | None] = {"embeds": embeds, "mask": _full_mask(embeds, mask)}
        if self.guided:
            negative, negative_mask = pipe.encode_prompt(
                prompt=self.negative_prompt, image=[source], device=self.device, num_images_per_prompt=n
            )
            tensors |= {"negative": negative, "negative_mask": _full_mask(negative, negative_mask)}
        pixels = pipe.image_processor.preprocess(source, side, side).unsqueeze(2)
        latents, image_latents = pipe.prepare_latents(
            pixels, n, self.transformer.config.in_channels // 4, side, side, self.dtype, self.device, generator
        )
        tensors["image_latents"] = image_latents
        return Conditioning(tensors), latents

    def schedule(self, steps: int, latents: torch.Tensor) -> tuple[list[float], list[float]]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps

        scheduler = self.pipeline.scheduler
        mu = calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.tolist(), scheduler.timesteps.tolist()

    def _predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None,
        image_latents: torch.Tensor,
    ) -> torch.Tensor:
        out = self.transformer(
            hidden_states=torch.cat([latents, image_latents], dim=1),
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[self._img_shapes] * latents.shape[0],
            return_dict=False,
        )[0]
        return out[:, : latents.size(1)]

    def velocity(self, latents: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
        c = conditioning.tensors
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=latents.dtype)
        cond = self._predict(latents, t, c["embeds"], c["mask"], c["image_latents"])
        if not self.guided:
            return cond
        uncond = self._predict(latents, t, c["negative"], c["negative_mask"], c["image_latents"])
        combined = cfg_combine(uncond, cond, self.guidance_scale)
        # the pipeline keeps the conditional prediction's norm per token
        return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self.pipeline
        vae = pipe.vae
        side = self.resolution
        unpacked = pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(unpacked)
        std = torch.tensor(vae.config.latents_std).view(shape).to(unpacked)
        images = vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images, output_type="pil")


def _full_mask(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The pipeline drops an all-ones mask; keep one so rows can be sliced alike."""
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask
