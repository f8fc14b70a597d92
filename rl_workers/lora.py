"""LoRA adapters on the generator's transformer: what trains, the frozen reference, checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Attention projections: named alike in SD3's and Qwen-Image's transformers.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def add_lora(transformer: torch.nn.Module, rank: int, alpha: int, seed: int) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (B = 0, so the policy starts as the base model) and return its weights.

    A is drawn from `seed` alone, so every worker of a run starts from the same adapter. The weights
    are kept in float32 so the optimizer state is exact even when the model runs in bfloat16.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)  # type: ignore[operator]
    params = [p for name, p in transformer.named_parameters() if "lora_" in name]
    if not params:
        raise ValueError("no attention projection matched the LoRA targets: unsupported transformer")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextmanager
def reference_policy(transformer: Any) -> Iterator[None]:
    """The frozen reference for the KL term: the same transformer with its adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_lora(pipeline: Any, path: Path, settings: dict[str, Any], step: int) -> Path:
    """Write the adapter where `pipeline.load_lora_weights(path)` reads it (rank and alpha included, so it
    loads at the strength it trained with), with the settings that made it."""
    from peft.utils import get_peft_model_state_dict

    transformer = pipeline.transformer
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(transformer).items()
    }
    type(pipeline).save_lora_weights(
        path,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    (path / "firm_rollout.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2, default=str))
    return path
