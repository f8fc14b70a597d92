"""All configuration of a rollout worker in one typed object (CLI flags and FIRM_RL_* variables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.protocol import Task
from clients.tasks import GEN
from foundation.cache import default_cache_dir
from foundation.flags import FORMER_VALUES, renamed
from rl_workers.recipes import ALGORITHM_TITLES, AlgorithmName, Recipe
from rl_workers.tasks import FORMER_TASK_NAMES, ROLLOUT_TASKS, per_recipe, per_task


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
    algorithm: AlgorithmName = Field(
        "grpo",
        description="; ".join(f"{name}: {title}" for name, title in ALGORITHM_TITLES.items())
        + ". Settings left unset take the algorithm's defaults for the task (its recipe).",
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
    group_size: int | None = Field(
        None, ge=2, description=f"Samples per prompt (G); default {per_recipe(lambda r: r.group_size)}."
    )
    groups_per_step: int = Field(2, ge=1, description="Prompt groups each worker samples per training step.")
    resolution: int = Field(512, ge=32, description="Image side in pixels (square).")
    sample_steps: int | None = Field(
        None,
        ge=1,
        description="Denoising steps of the training sampler (grpo: SDE; nft: deterministic dpm2); default "
        f"{per_recipe(lambda r: r.sample_steps)}.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Denoising steps of the deterministic ODE sampler for evaluation; default "
        f"{per_recipe(lambda r: r.eval_steps)}.",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate (ODE sampling, mean reward) every N steps; 0 = never.")
    noise_level: float = Field(0.7, gt=0, description="SDE noise scale (Flow-GRPO's a); higher explores more.")
    guidance_scale: float | None = Field(
        None, ge=1.0, description=f"CFG scale (1: none); default {per_recipe(lambda r: r.guidance_scale)}."
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
    learning_rate: float | None = Field(
        None,
        gt=0,
        description=f"AdamW learning rate of the LoRA weights; default {per_recipe(lambda r: r.learning_rate)}.",
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip range (ratios stay near 1 per step).")
    kl_beta: float | None = Field(
        None,
        ge=0,
        description="Weight of the KL to the frozen reference (LoRA off); 0 skips the reference pass. grpo: the "
        "--kl-form KL of the steps; nft: the mean squared distance of the velocities (the release's train.beta). "
        f"Default {per_recipe(lambda r: r.kl_beta)}.",
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
        description="grpo: the first int(fraction * sample_steps) denoising steps train (at least one); 0.99 leaves "
        "out the last, nearly noise-free step. nft: that many of the stored steps, drawn at random.",
    )
    updates_per_step: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps per training step: the step's samples are split into this many "
        "mini-batches, so later ones see a moved policy and the ratio clip matters; default "
        f"{per_recipe(lambda r: r.updates_per_step)}.",
    )
    train_tied_groups: bool | None = Field(
        None,
        description="Whether a group whose rewards are all equal trains, with advantage 0 (nft: its samples are "
        "pulled toward the old adapter's predictions; grpo: only the KL would act); default "
        f"{per_recipe(lambda r: r.train_tied_groups)}.",
    )
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Keep an exponential moving average of the LoRA weights, with this decay (warmed up as "
        "min((1 + n) / (10 + n), decay) after optimizer step n, as the release), and evaluate and save it "
        f"instead of the trained weights; 0 = no EMA. Default {per_recipe(lambda r: r.ema_decay)}.",
    )
    nft_beta: float = Field(
        1.0,
        gt=0,
        description="nft: the strength beta of the implicit policies (positive: beta v + (1 - beta) v_old; "
        "negative: (1 + beta) v_old - beta v); the release's config.beta.",
    )
    old_decay_type: int = Field(
        1,
        ge=0,
        le=2,
        description="nft: how the sampling (old) adapter trails the trained one after each training step, the "
        "release's decay_type: old = d old + (1 - d) trained with, after n optimizer steps, d = 0 (type 0), "
        "min(0.001 n, 0.5) (type 1), or 0 for n < 75 then min(0.0075 (n - 75), 0.999) (type 2).",
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
        recipe = ROLLOUT_TASKS[self.task].recipes[self.algorithm]
        for name in RECIPE_SETTINGS:  # unset: the algorithm's default for the task, recorded with the run
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
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
        assert self.guidance_scale is not None  # set from the recipe when unset
        return self.guidance_scale


# Settings whose default is the recipe's (`rl_workers.recipes.Recipe`), each its field of the same name.
RECIPE_SETTINGS = tuple(field.name for field in dataclasses.fields(Recipe))
