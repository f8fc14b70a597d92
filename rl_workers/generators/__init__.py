"""Generators behind one interface; `load_generator` builds the one the settings ask for."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rl_workers.generators.base import Condition, Conditioning, Generator

if TYPE_CHECKING:
    from rl_workers.settings import RolloutSettings

__all__ = ["Condition", "Conditioning", "Generator", "load_generator", "resolve_device"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _missing_components(model: str) -> dict[str, Any]:
    """Components a local pipeline folder was saved without (SD3 without T5): load them as None."""
    index = Path(model) / "model_index.json"
    if not index.exists():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and v[0] is None}


def _place(pipeline: Any, device: torch.device, offload_text_encoders: bool) -> Any:
    """Move the pipeline's models to `device`; text encoders stay on the CPU when they are offloaded
    (the generator's prompt cache brings them over for each new prompt)."""
    for name, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            if not (offload_text_encoders and name.startswith("text_encoder")):
                module.to(device)
    return pipeline


def load_generator(settings: RolloutSettings, device: torch.device) -> Generator:
    """Load the generator's pipeline (hub id or folder), freeze it, and wrap it for the rollout loop."""
    from rl_workers.tasks import rollout_task
    from rl_workers.tiny import ensure_tiny_pipeline

    kind = rollout_task(settings.task).generator
    model = str(ensure_tiny_pipeline(settings.cache_dir, kind)) if settings.tiny else settings.model_id
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": settings.revision} | _missing_components(model)
    generator = LOADERS[kind](settings, model, kwargs, device)
    generator.pipeline.set_progress_bar_config(disable=True)
    checkpointing = settings.gradient_checkpointing
    if checkpointing if checkpointing is not None else device.type == "cuda":
        generator.transformer.enable_gradient_checkpointing()  # type: ignore[operator]
    return generator


def _offload(settings: RolloutSettings, device: torch.device) -> bool:
    return settings.offload_text_encoders and device.type != "cpu"


def _shared(settings: RolloutSettings, device: torch.device) -> dict[str, Any]:
    """The options every generator takes."""
    return {
        "resolution": settings.resolution,
        "guidance_scale": settings.guidance,
        "cfg_grad": settings.cfg_grad,
        "prompt_cache": settings.prompt_cache,
        "offload_text_encoders": _offload(settings, device),
    }


def _sd3(settings: RolloutSettings, model: str, kwargs: dict[str, Any], device: torch.device) -> Generator:
    from diffusers import StableDiffusion3Pipeline

    from rl_workers.generators.sd3 import SD3Generator

    if settings.drop_t5:
        kwargs |= {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = _place(StableDiffusion3Pipeline.from_pretrained(model, **kwargs), device, _offload(settings, device))
    return SD3Generator(pipeline, max_sequence_length=settings.max_sequence_length, **_shared(settings, device))


def _qwen_edit(settings: RolloutSettings, model: str, kwargs: dict[str, Any], device: torch.device) -> Generator:
    from diffusers import QwenImageEditPipeline

    from rl_workers.generators.qwen_edit import QwenEditGenerator

    pipeline = _place(QwenImageEditPipeline.from_pretrained(model, **kwargs), device, _offload(settings, device))
    return QwenEditGenerator(
        pipeline, vae_side=settings.vae_side, vl_side=settings.vl_side, **_shared(settings, device)
    )


# Each generator under the name the task table gives it: (settings, model, from_pretrained options, device).
LOADERS: dict[str, Callable[[RolloutSettings, str, dict[str, Any], torch.device], Generator]] = {
    "sd3": _sd3,
    "qwen_edit": _qwen_edit,
}
