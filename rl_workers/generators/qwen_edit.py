"""Qwen-Image-Edit (instruction editing) behind the generator interface, on diffusers' components.

The source conditions the model twice, as in `QwenImageEditPipeline`: the VAE encodes it at about
`vae_side`² pixels (the pipeline's 1024²) at its own aspect ratio, and those latents are concatenated
to the noisy ones at every step; the vision-language text encoder sees it at about `vl_side`² (the
FIRM release's 384²) with the instruction. The edited images are about `resolution`² pixels at the
source's aspect ratio, and the critic is shown the source resized to that size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from rl_workers.generators.base import Condition, Conditioning, Generator, cfg_combine
from rl_workers.generators.prompt_cache import Embeddings, PromptCache, repeat_rows


def edit_size(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels at the source's aspect ratio, each a multiple of `multiple`.

    >>> edit_size(1024, 768, 512 * 512)
    (576, 448)
    """
    ratio = width / height
    w = math.sqrt(area * ratio)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(w / ratio / multiple) * multiple)


class QwenEditGenerator(Generator):
    """Editing: the condition is a source image and an instruction."""

    def __init__(
        self,
        pipeline: Any,
        *,
        resolution: int,
        guidance_scale: float,
        vae_side: int = 1024,
        vl_side: int = 384,
        negative_prompt: str = " ",
        cfg_grad: str = "cond",
        prompt_cache: int = 1024,
        offload_text_encoders: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.resolution = resolution
        self.guidance_scale = guidance_scale  # Qwen's "true" CFG, with the norm rescale of the pipeline
        self.vae_side = vae_side
        self.vl_side = vl_side
        self.negative_prompt = negative_prompt
        self.cfg_grad = cfg_grad
        encoders = [pipeline.text_encoder]
        self.prompts = PromptCache(encoders, self.device, size=prompt_cache, offload=offload_text_encoders)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def _encode_text(self, prompt: str, source: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipeline.encode_prompt(prompt=prompt, image=[source], device=self.device)
        if mask is None:  # the pipeline drops an all-ones mask; keep one so rows slice alike
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def _embed(self, instruction: str, source: Image.Image) -> Embeddings:
        """The instruction and the negative prompt, each with the source at the encoder's size (batch 1)."""
        width, height = edit_size(*source.size, self.vl_side**2)
        seen = self.pipeline.image_processor.resize(source, height, width)
        embeds, mask = self._encode_text(instruction, seen)
        tensors: Embeddings = {"embeds": embeds, "mask": mask}
        if self.guided:
            negative, negative_mask = self._encode_text(self.negative_prompt, seen)
            tensors |= {"negative": negative, "negative_mask": negative_mask}
        return tensors

    @torch.no_grad()
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        if condition.source is None:
            raise ValueError(f"editing needs a source image (condition {condition.id!r} has none)")
        pipe = self.pipeline
        original = condition.source.convert("RGB")
        # the encoder sees the source, so the cache key holds its pixels' digest: equal ids never share embeddings
        source_digest = hashlib.blake2b(original.tobytes(), digest_size=16).hexdigest()
        key = (condition.prompt, source_digest, original.size, self.vl_side)
        tensors = repeat_rows(self.prompts.get(key, lambda: self._embed(condition.prompt, original)), n)
        masks = [m for m in (tensors.get("mask"), tensors.get("negative_mask")) if m is not None]
        unmasked = all(bool(m.all()) for m in masks)
        width, height = edit_size(*original.size, self.resolution**2)
        vae_width, vae_height = edit_size(*original.size, self.vae_side**2)
        pixels = pipe.image_processor.preprocess(original, vae_height, vae_width).unsqueeze(2)
        latents, image_latents = pipe.prepare_latents(
            pixels, n, self.transformer.config.in_channels // 4, height, width, self.dtype, self.device, generator
        )
        tensors["image_latents"] = image_latents
        factor = pipe.vae_scale_factor * 2
        shapes = [(1, height // factor, width // factor), (1, vae_height // factor, vae_width // factor)]
        shown = original.resize((width, height), Image.Resampling.BICUBIC)  # what the critic compares against
        group = {"width": width, "height": height, "img_shapes": shapes, "unmasked": unmasked, "source": shown}
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
        # float32 as the release builds it: bfloat16 would round a timestep near 900 to a step of 4
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.float32)
        cond = self._predict(latents, t, conditioning, negative=False)
        if not self.guided:
            return cond
        with torch.set_grad_enabled(not self.uncond_without_grad):  # its own pass: no activations kept
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
