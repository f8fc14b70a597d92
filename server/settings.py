"""All configuration of the server in one typed object.

Values come from, highest priority first: command-line flags, `FIRM_*` environment variables,
the defaults below. Every field's description is its `--help` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.protocol import MAX_ITEMS_PER_REQUEST, RewardWeights, ScoreMode
from server.images import ImageLimits

DISABLED = "none"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "firm-reward-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIRM_", extra="forbid")

    # models
    edit_model: str = Field(
        "VisionXLab/FIRM-Edit-8B",
        description="FIRM-Edit checkpoint (hub id or local folder) for /v1/edit/*; 'none' switches editing off.",
    )
    gen_model: str = Field(
        "VisionXLab/FIRM-Gen-8B",
        description="FIRM-Gen checkpoint (hub id or local folder) for /v1/gen/*; 'none' switches generation off.",
    )
    edit_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the edit model.")
    gen_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the gen model.")
    tiny: bool = Field(
        False,
        description="Serve a tiny randomly initialised critic built locally (no download) for both tasks. "
        "Its scores are meaningless: for smoke tests only.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Where the --tiny checkpoint is built and kept."
    )

    # engine
    engine: str = Field(
        "auto",
        description="Inference engine: 'auto' (the best available), 'transformers', or a plug-in engine "
        "given as 'package.module:ClassName'.",
    )
    device: str = Field("auto", description="Device for the transformers engine: auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto is bfloat16 on GPU and float32 on CPU."
    )
    max_new_tokens: int = Field(256, ge=8, le=4096, description="Most tokens a judge may write per answer.")
    max_batch_size: int = Field(
        16, ge=1, le=512, description="Most judge calls in one engine batch (micro-batched engines)."
    )
    max_wait_ms: float = Field(
        10.0, ge=0.0, le=10_000.0, description="Longest a judge call waits for others to fill its batch."
    )

    # scoring
    score_mode: ScoreMode = Field(
        "argmax",
        description="What feeds the reward by default: 'argmax' (the written score, as in the paper) or "
        "'expected' (probability-weighted mean over the score tokens; smoother rewards).",
    )
    cme_w1: float = Field(0.6, ge=0.0, le=1.0, description="CME editing reward: constant weight w1.")
    cme_w2: float = Field(0.4, ge=0.0, le=1.0, description="CME editing reward: consistency weight w2.")
    qma_w1: float = Field(0.4, ge=0.0, le=1.0, description="QMA generation reward: constant weight w1.")
    qma_w2: float = Field(0.6, ge=0.0, le=1.0, description="QMA generation reward: quality weight w2.")

    # prompt templates
    edit_execution_template: Path | None = Field(None, description="Template file replacing the edit execution prompt.")
    edit_consistency_template: Path | None = Field(
        None, description="Template file replacing the edit consistency prompt."
    )
    gen_instruction_following_template: Path | None = Field(
        None, description="Template file replacing the gen instruction-following prompt."
    )
    gen_quality_template: Path | None = Field(None, description="Template file replacing the gen quality prompt.")

    # HTTP and limits
    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_items_per_request: int = Field(
        64, ge=1, le=MAX_ITEMS_PER_REQUEST, description="Most items (or group candidates) in one request."
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest encoded image, in bytes.")
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Most pixels an image may have; larger ones are refused before decoding.",
    )
    image_pixel_budget: int = Field(
        1024 * 1024, ge=64, description="Images are downscaled to at most this many pixels before judging."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.cme_weights()
        self.qma_weights()
        if self.edit_model == DISABLED and self.gen_model == DISABLED:
            raise ValueError("both models are switched off; at least one of --edit-model/--gen-model is needed")
        return self

    def cme_weights(self) -> RewardWeights:
        return RewardWeights(w1=self.cme_w1, w2=self.cme_w2)

    def qma_weights(self) -> RewardWeights:
        return RewardWeights(w1=self.qma_w1, w2=self.qma_w2)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            pixel_budget=self.image_pixel_budget,
        )

    def template_overrides(self) -> dict[str, Path | None]:
        return {
            "edit_execution": self.edit_execution_template,
            "edit_consistency": self.edit_consistency_template,
            "gen_instruction_following": self.gen_instruction_following_template,
            "gen_quality": self.gen_quality_template,
        }
