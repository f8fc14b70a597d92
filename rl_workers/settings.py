"""All configuration of a rollout worker in one typed object (CLI flags and FIRM_RL_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.protocol import Task
from clients.tasks import GEN
from foundation.cache import default_cache_dir
from foundation.flags import FORMER_VALUES, renamed
from rl_workers.tasks import FORMER_TASK_NAMES, ROLLOUT_TASKS, per_task


class RolloutSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIRM_RL_", extra="forbid")

    # what to train
    task: Task = Field(
        GEN.name,
        description="; ".join(
            f"{name}: {t.generator_title} scored by the {t.spec.title} critic ({t.spec.reward})"
            for name, t in ROLLOUT_TASKS.items()
        )
        + f". Formerly also spelled {', '.join(FORMER_TASK_NAMES)} (still accepted, with a warning).",
        json_schema_extra={FORMER_VALUES: FORMER_TASK_NAMES},
    )
    model: str | None = Field(
        None,
        description=f"Generator checkpoint (hub id or folder); default {per_task(lambda t: t.model)}.",
    )
    revision: str | None = Field(None, description="Hub revision of the generator.")
    drop_t5: bool = Field(False, description="Load SD3 without its T5 text encoder (saves ~10 GB; lower quality).")
    tiny: bool = Field(False, description="Use a tiny random pipeline built locally (no download): smoke tests only.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where --tiny pipelines are built.")
    prompts: Path = Field(..., description=f"Prompt file: {per_task(lambda t: t.prompt_file)}.")
    output_dir: Path = Field(Path("firm-rollout-out"), description="Checkpoints and the metrics log go here.")

    # rewards
    reward_url: str | None = Field(
        None, description="Reward server base URL(s), comma-separated; default FIRM_URLS or http://127.0.0.1:8000."
    )
    score_mode: Literal["argmax", "expected"] | None = Field(
        None,
        description="Which score feeds the reward: argmax (the paper) or expected (smoother, fewer tied groups); "
        "default: the server's.",
    )
    overlap: bool = Field(True, description="Score each group while the next one samples.")
    std_floor: float = Field(0.01, gt=0, description="Floor on a group's reward std when normalising advantages.")
    adv_std: Literal["group", "global"] = Field(
        "global",
        description="Divide each group's centred rewards by the std of every reward of the step on all ranks "
        "(Flow-GRPO's default, global_std), or by the group's own std.",
    )
    adv_clip: float = Field(5.0, gt=0, description="Advantages are clipped to [-adv_clip, adv_clip].")
    max_failed_steps: int = Field(
        10,
        ge=1,
        description="Stop (after saving a checkpoint) when this many consecutive steps got no reward at all, "
        "on any rank. Steps with some rewards reset the count.",
    )

    # sampling
    group_size: int = Field(16, ge=2, description="Samples per prompt (G); the paper uses 16.")
    groups_per_step: int = Field(2, ge=1, description="Prompt groups each worker samples per training step.")
    resolution: int = Field(512, ge=32, description="Image side in pixels (square).")
    sample_steps: int = Field(10, ge=1, description="Denoising steps of the SDE sampler during training.")
    eval_steps: int = Field(40, ge=1, description="Denoising steps of the deterministic ODE sampler for evaluation.")
    eval_every: int = Field(0, ge=0, description="Evaluate (ODE sampling, mean reward) every N steps; 0 = never.")
    noise_level: float = Field(0.7, gt=0, description="SDE noise scale (Flow-GRPO's a); higher explores more.")
    guidance_scale: float | None = Field(
        None, ge=1.0, description=f"CFG scale; default {per_task(lambda t: t.guidance)}."
    )
    max_sequence_length: int = Field(256, ge=8, description="Text tokens given to SD3's T5 encoder.")
    source_vae_side: int | None = Field(
        None,
        ge=32,
        description="Editing: the source is VAE-encoded at about this side squared in pixels, at its own aspect "
        "ratio; default 1024 (QwenImageEditPipeline's), or the resolution with --tiny.",
    )
    source_vl_side: int | None = Field(
        None,
        ge=28,
        description="Editing: the vision-language text encoder sees the source at about this side squared; "
        "default 384 (the FIRM release's; the diffusers pipeline uses 1024), or the resolution with --tiny.",
    )
    decode_batch: int = Field(
        4, ge=1, description="Images the VAE decodes at once; a whole group at once would set the memory peak."
    )
    prompt_cache: int = Field(
        1024, ge=0, description="Prompt embeddings kept (on the CPU) per worker, so each prompt is embedded once."
    )
    offload_text_encoders: bool = Field(
        True, description="Keep text encoders on the CPU, moving them to the GPU only to embed an uncached prompt."
    )

    # update
    steps: int = Field(100, ge=1, description="Training steps.")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip range (ratios stay near 1 per step).")
    kl_beta: float = Field(
        0.04, ge=0, description="Weight of the KL to the frozen reference (LoRA off); 0 skips the reference pass."
    )
    kl_form: Literal["flow_grpo", "exact"] = Field(
        "flow_grpo",
        description="flow_grpo: squared distance of the step means / (2 std^2), as Flow-GRPO (its beta values "
        "assume it); exact: the KL between the two Gaussian steps, / (2 std^2 |dt|), larger by 1/|dt|.",
    )
    cfg_grad: Literal["cond", "both"] = Field(
        "cond",
        description="Which CFG branch the update backpropagates through: cond (the unconditional prediction is "
        "detached, as Flow-GRPO) or both.",
    )
    timestep_fraction: float = Field(
        0.99,
        gt=0,
        le=1,
        description="The first int(fraction * sample_steps) denoising steps train (at least one); 0.99 leaves "
        "out the last, nearly noise-free step.",
    )
    updates_per_step: int = Field(
        2,
        ge=1,
        description="Optimizer steps per training step: the step's samples are split into this many "
        "mini-batches, so later ones see a moved policy and the ratio clip matters.",
    )
    train_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per forward pass in the update (gradients accumulate); default "
        f"{per_task(lambda t: t.train_batch)}.",
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute the transformer's activations in the backward pass; default on for GPUs."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    lora_rank: int = Field(32, ge=1, description="LoRA rank on the transformer's attention projections.")
    lora_alpha: int = Field(64, ge=1, description="LoRA alpha.")
    save_every: int = Field(10, ge=0, description="Save the LoRA weights every N steps (and at the end); 0 = end only.")

    # process
    seed: int = Field(0, description="Seed; each rank adds its rank.")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, cuda:1 ...")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when it is installed.")
    wandb_project: str | None = Field(None, description="Also log to this Weights & Biases project (when installed).")
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("task", mode="before")
    @classmethod
    def _former_task_name(cls, value: object) -> object:
        return renamed(value, FORMER_TASK_NAMES, "--task (FIRM_RL_TASK)")

    @model_validator(mode="after")
    def _check(self) -> RolloutSettings:
        if self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (latent patches), not {self.resolution}")
        return self

    @property
    def model_id(self) -> str:
        return self.model or ROLLOUT_TASKS[self.task].model

    @property
    def vae_side(self) -> int:
        return self.source_vae_side or (self.resolution if self.tiny else 1024)

    @property
    def vl_side(self) -> int:
        return self.source_vl_side or (self.resolution if self.tiny else 384)

    @property
    def batch_size(self) -> int:
        return self.train_batch_size or ROLLOUT_TASKS[self.task].train_batch

    @property
    def guidance(self) -> float:
        return self.guidance_scale if self.guidance_scale is not None else ROLLOUT_TASKS[self.task].guidance
