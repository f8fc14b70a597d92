"""The training algorithms a worker can run, and the defaults each brings to a task (its recipe).

A recipe holds the settings whose defaults depend on the algorithm: the values of the run the
algorithm reproduces (Flow-GRPO's, or the FIRM release's DiffusionNFT configs). Each task's entry in
`rl_workers.tasks` holds one recipe per algorithm; a setting left unset takes its recipe's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

AlgorithmName = Literal["grpo", "nft"]
ALGORITHM_NAMES: tuple[str, ...] = get_args(AlgorithmName)

ALGORITHM_TITLES: dict[str, str] = {
    "grpo": "Flow-GRPO: SDE sampling with recorded log-probabilities and the clipped policy-gradient loss",
    "nft": "DiffusionNFT, the FIRM release's recipe: deterministic dpm2 sampling from an adapter that trails the "
    "trained one, and the implicit positive/negative flow-matching loss",
}


@dataclass(frozen=True)
class Recipe:
    """The defaults one algorithm brings to one task: each field is the default of the rollout setting of
    the same name."""

    group_size: int  # samples per prompt (G)
    sample_steps: int  # denoising steps of the training sampler
    eval_steps: int  # denoising steps of the evaluation sampler
    guidance_scale: float  # classifier-free guidance scale while sampling and training (1: none)
    learning_rate: float
    kl_beta: float  # weight of the KL to the frozen reference (LoRA off)
    updates_per_step: int  # optimizer steps per training step
    ema_decay: float  # decay of the EMA of the LoRA weights used to evaluate and save; 0: no EMA
    train_tied_groups: bool  # whether a group whose rewards are all equal trains (with advantage 0)
