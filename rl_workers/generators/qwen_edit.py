"""Qwen-Image-Edit (instruction editing) behind the generator interface, on diffusers' components.

The source image is resized to about `resolution`² pixels at its own aspect ratio (sides multiples
of 32, as the pipeline does), encoded once by the VAE per group and concatenated to the noisy
latents at every step; the text encoder sees the source image and the instruction. The edited
images have the same size, and the critic is shown that resized source.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from rl_workers.generators.base import Condition, Conditioning, Generator, cfg_combine


def edit_size(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels at the source's aspect ratio, each a multiple of `multiple`.

    >>> edit_size(1024, 768, 512 * 512)
    (576, 448)
    """
    ratio = width / height
    w = math.sqrt(area * ratio)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(w / ratio / multiple) * multiple)


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

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def _encode_text(self, prompt: str, source: Image.Image, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompt, image=[source], device=self.device, num_images_per_prompt=n
        )
        if mask is None:  # the pipeline drops an all-ones mask; keep one so rows slice alike
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        if condition.source is None:
            raise ValueError(f"editing needs a source image (condition {condition.id!r} has none)")
        pipe = self.pipeline
        width, height = edit_size(*condition.source.size, self.resolution**2)
        source = condition.source.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        embeds, mask = self._encode_text(condition.prompt, source, n)
        tensors: dict[str, torch.Tensor | None] = {"embeds": embeds, "mask": mask}
        unmasked = bool(mask.all())
        if self.guided:
            negative, negative_mask = self._encode_text(self.negative_prompt, source, n)
            tensors |= {"negative": negative, "negative_mask": negative_mask}
            unmasked = unmasked and bool(negative_mask.all())
        pixels = pipe.image_processor.preprocess(source, height, width).unsqueeze(2)
        latents, image_latents = pipe.prepare_latents(
            pixels, n, self.transformer.config.in_channels // 4, height, width, self.dtype, self.device, generator
        )
        tensors["image_latents"] = image_latents
        factor = pipe.vae_scale_factor * 2
        shape = (1, height // factor, width // factor)
        group = {"width": width, "height": height, "img_shapes": [shape, shape], "unmasked": unmasked, "source": source}
        return Conditioning(tensors, group), latents

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

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, c: Conditioning, negative: bool) -> torch.Tensor:
        embeds = c.tensors["negative" if negative else "embeds"]
        mask = None if c.group["unmasked"] else c.tensors["negative_mask" if negative else "mask"]  # faster SDPA
        out = self.transformer(
            hidden_states=torch.cat([latents, c.tensors["image_latents"]], dim=1),
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[c.group["img_shapes"]] * latents.shape[0],
            return_dict=False,
        )[0]
        return out[:, : latents.size(1)]

    def velocity(self, latents: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=latents.dtype)
        cond = self._predict(latents, t, conditioning, negative=False)
        if not self.guided:
            return cond
        uncond = self._predict(latents, t, conditioning, negative=True)
        combined = cfg_combine(uncond, cond, self.guidance_scale)
        # the pipeline keeps the conditional prediction's norm per token
        return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> list[Image.Image]:
        pipe = self.pipeline
        vae = pipe.vae
        height, width = conditioning.group["height"], conditioning.group["width"]
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(unpacked)
        std = torch.tensor(vae.config.latents_std).view(shape).to(unpacked)
        images = vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images, output_type="pil")
