"""Stable Diffusion 3.5 (text-to-image) behind the generator interface, on diffusers' components."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from rl_workers.generators.base import Condition, Conditioning, Generator, cfg_combine


class SD3Generator(Generator):
    task = "t2i"

    def __init__(self, pipeline: Any, *, resolution: int, guidance_scale: float, max_sequence_length: int) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.resolution = resolution
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        pipe = self.pipeline
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=condition.prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=self.guided,
            negative_prompt="",
            max_sequence_length=self.max_sequence_length,
        )
        latents = pipe.prepare_latents(
            n,
            self.transformer.config.in_channels,
            self.resolution,
            self.resolution,
            self.dtype,
            self.device,
            generator,
        )
        tensors = {"embeds": embeds, "pooled": pooled, "negative": negative, "negative_pooled": negative_pooled}
        return Conditioning(tensors), latents

    def schedule(self, steps: int, latents: torch.Tensor) -> tuple[list[float], list[float]]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        scheduler = self.pipeline.scheduler
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.transformer.config.patch_size
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, steps, "cpu", **kwargs)
        return scheduler.sigmas.tolist(), scheduler.timesteps.tolist()

    def velocity(self, latents: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
        c = conditioning.tensors
        n = latents.shape[0]
        if self.guided:
            hidden = torch.cat([latents, latents])
            text = torch.cat([c["negative"], c["embeds"]])
            pooled = torch.cat([c["negative_pooled"], c["pooled"]])
        else:
            hidden, text, pooled = latents, c["embeds"], c["pooled"]
        # float32 like the pipeline: bf16 would round 602.15 to 604, off the trained schedule
        t = torch.full((hidden.shape[0],), timestep, device=latents.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=hidden, timestep=t, encoder_hidden_states=text, pooled_projections=pooled, return_dict=False
        )[0]
        return cfg_combine(out[:n], out[n:], self.guidance_scale) if self.guided else out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> list[Image.Image]:
        vae = self.pipeline.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(scaled, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
