"""Stable Diffusion 3.5 (text-to-image) behind the generator interface, on diffusers' components."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from rl_workers.generators.base import Condition, Conditioning, Generator, cfg_combine
from rl_workers.generators.prompt_cache import Embeddings, PromptCache, repeat_rows

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class SD3Generator(Generator):
    """Text-to-image: the condition is a prompt."""

    def __init__(
        self,
        pipeline: Any,
        *,
        resolution: int,
        guidance_scale: float,
        max_sequence_length: int,
        cfg_grad: str = "cond",
        prompt_cache: int = 1024,
        offload_text_encoders: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.resolution = resolution
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.cfg_grad = cfg_grad
        encoders = [getattr(pipeline, n) for n in TEXT_ENCODERS if getattr(pipeline, n, None) is not None]
        self.prompts = PromptCache(encoders, self.device, size=prompt_cache, offload=offload_text_encoders)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def _embed(self, prompt: str) -> Embeddings:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.guided,
            negative_prompt="",
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled, "negative": negative, "negative_pooled": negative_pooled}

    @torch.no_grad()
    def prepare(self, condition: Condition, n: int, generator: torch.Generator) -> tuple[Conditioning, torch.Tensor]:
        pipe = self.pipeline
        tensors = repeat_rows(self.prompts.get(condition.prompt, lambda: self._embed(condition.prompt)), n)
        latents = pipe.prepare_latents(
            n,
            self.transformer.config.in_channels,
            self.resolution,
            self.resolution,
            self.dtype,
            self.device,
            generator,
        )
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

    def _forward(self, hidden: torch.Tensor, timestep: float, text: Any, pooled: Any) -> torch.Tensor:
        # float32 like the pipeline: bf16 would round 602.15 to 604, off the trained schedule
        t = torch.full((hidden.shape[0],), timestep, device=hidden.device, dtype=torch.float32)
        return self.transformer(  # type: ignore[no-any-return]
            hidden_states=hidden, timestep=t, encoder_hidden_states=text, pooled_projections=pooled, return_dict=False
        )[0]

    def velocity(self, latents: torch.Tensor, timestep: float, conditioning: Conditioning) -> torch.Tensor:
        c = conditioning.tensors
        if not self.guided:
            return self._forward(latents, timestep, c["embeds"], c["pooled"])
        # both branches in one batch, in sampling and update alike, so an unchanged policy recomputes
        # exactly the recorded log-probabilities; the update detaches the unconditional half unless asked
        n = latents.shape[0]
        text, pooled = torch.cat([c["negative"], c["embeds"]]), torch.cat([c["negative_pooled"], c["pooled"]])
        out = self._forward(torch.cat([latents, latents]), timestep, text, pooled)
        uncond = out[:n].detach() if self.uncond_without_grad else out[:n]
        return cfg_combine(uncond, out[n:], self.guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, conditioning: Conditioning) -> list[Image.Image]:
        vae = self.pipeline.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(scaled, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
