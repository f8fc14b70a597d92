"""All configuration of the server in one typed object.

Values come from, highest priority first: command-line flags, `FIRM_*` environment variables,
the defaults below. Every field's description is its `--help` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.protocol import MAX_ITEMS_PER_REQUEST, RewardWeights, ScoreMode
from server.images import QWEN3_VL_MAX_PIXELS, ImageLimits
from server.judges import RELEASE_BUDGETS
from server.prompts.release import DEFAULT_SOURCE
from server.security import KeyRing, is_loopback, load_keys

SWITCHED_OFF = "none"  # the model setting that switches a critic off (its state is then "disabled")


def default_cache_dir() -> Path:
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
        description="Serve a tiny randomly initialised critic built locally (no download) for every enabled task. "
        "Its scores are meaningless: for smoke tests only.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the --tiny checkpoint is built and the release's prompt files are kept.",
    )

    # prompts
    prompts: str = Field(
        "auto",
        description="Prompt set of every judge: 'auto' (the released checkpoints get the release's prompts, a "
        "critic trained with firm-train the set it was trained with, any other model this project's own), "
        "'firm' (the release's, for every model), 'own' (this project's packaged templates) or a directory of "
        "your own '<judge>.txt' templates.",
    )
    prompt_source: str = Field(
        DEFAULT_SOURCE,
        description="Where the release's prompt files are read: a base URL or a local directory laid out like "
        "the release. They are checked against pinned SHA-256 digests and cached in --cache-dir.",
    )
    allow_prompt_drift: bool = Field(
        False, description="Serve release prompt files whose digest differs from the pinned one (logged)."
    )

    # engine
    engine: str = Field(
        "auto",
        description="Inference engine: 'auto' (vllm when installed and CUDA is present, else transformers), "
        "'transformers', 'vllm', 'openai' (a remote OpenAI-compatible server), or a plug-in engine given as "
        "'package.module:ClassName'.",
    )
    device: str = Field("auto", description="Device for the transformers engine: auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto is bfloat16 on GPU and float32 on CPU."
    )
    edit_max_new_tokens: int = Field(
        RELEASE_BUDGETS["edit"],
        ge=8,
        description="Most tokens an edit judge may write per answer (the release's budget: 256).",
    )
    gen_max_new_tokens: int = Field(
        RELEASE_BUDGETS["gen"],
        ge=8,
        description="Most tokens a generation judge may write per answer (the release's budget: 8192, room for "
        "its requirement-by-requirement analysis).",
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        le=4096,
        description="Most judge calls in one engine batch (micro-batched engines). Large, because an engine's "
        "fixed cost per call dominates on a GPU; lower it if the transformers engine runs out of memory.",
    )
    max_wait_ms: float = Field(
        200.0,
        ge=0.0,
        le=10_000.0,
        description="Longest a batch waits for the callers the previous batch answered to send their next "
        "calls; it starts at once when they are all back.",
    )

    seed: int = Field(0, description="Sampling seed passed to the engine (decoding is greedy; the seed pins the rest).")
    structured_outputs: bool = Field(
        False,
        description="Constrain answers to each judge's format (JSON schema or regex) so they always parse; "
        "vllm and openai engines only.",
    )

    # vllm engine
    max_model_len: int = Field(
        16384, ge=512, description="vllm: longest prompt + answer, in tokens; must exceed both answer budgets."
    )
    edit_gpu_memory_utilization: float = Field(
        0.42, gt=0.0, le=0.95, description="vllm: share of GPU memory for the edit critic (both fit one GPU)."
    )
    gen_gpu_memory_utilization: float = Field(
        0.42, gt=0.0, le=0.95, description="vllm: share of GPU memory for the gen critic."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs each critic is split across.")
    prefix_caching: bool = Field(
        True, description="vllm: reuse the shared prompt prefix (images + rubric) across a GRPO group."
    )
    sleep_mode: bool = Field(
        False,
        description="vllm: allow POST /v1/admin/sleep to offload weights and free the GPU; turns the "
        "multimodal processor cache off, which would otherwise give stale inputs after a wake-up.",
    )
    enforce_eager: bool = Field(False, description="vllm: skip CUDA graph capture (faster start, slower runs).")

    # openai engine
    openai_base_urls: str | None = Field(
        None,
        description="openai: comma-separated base URLs of OpenAI-compatible servers, e.g. "
        "http://gpu1:8001/v1,http://gpu2:8001/v1; calls go to the one with the fewest in flight.",
    )
    openai_api_key: SecretStr | None = Field(None, description="openai: bearer key for those servers.")
    openai_edit_model: str | None = Field(
        None, description="openai: model name the remote server serves the edit critic as (default: --edit-model)."
    )
    openai_gen_model: str | None = Field(
        None, description="openai: model name the remote server serves the gen critic as (default: --gen-model)."
    )
    openai_timeout_s: float = Field(120.0, gt=0.0, description="openai: time limit of one call.")
    openai_max_retries: int = Field(2, ge=0, le=10, description="openai: retries of a failed call, on other URLs.")
    openai_max_connections: int = Field(64, ge=1, description="openai: connection pool size.")

    # security
    api_keys: SecretStr | None = Field(
        None,
        description="API keys as 'name:key' pairs, comma-separated (keys of 16 characters or more); when set, "
        "every route but /healthz and /readyz needs 'Authorization: Bearer <key>'.",
    )
    api_key_file: Path | None = Field(None, description="File of 'name:key' lines, added to --api-keys.")
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for /v1/admin/* (sleep and wake); admin routes are off without one."
    )
    protect_metrics: bool = Field(False, description="Require an API key for /metrics too.")
    insecure: bool = Field(
        False, description="Allow binding a non-loopback address without API keys (logged as a warning)."
    )

    # reliability
    request_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="Server deadline per request: past it the request answers 504 and its "
        "engine work is cancelled. Keep it below the clients' own deadline.",
    )
    max_queue: int = Field(
        1024, ge=1, description="Most judge calls waiting per model; past it requests get 429 with Retry-After."
    )
    cache_size: int = Field(
        10_000, ge=0, description="Judge answers kept for identical calls (same model, judge, images, text); 0 is off."
    )
    idempotency_window_s: float = Field(
        600.0, ge=0.0, description="A repeated X-Request-ID within this many seconds gets the first answer; 0 is off."
    )
    drain_timeout_s: float = Field(
        60.0, ge=0.0, description="On SIGTERM, how long in-flight requests may take before the process exits."
    )
    unhealthy_after: int = Field(
        3, ge=1, description="Consecutive failed engine batches after which readiness turns false until one succeeds."
    )
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON (with the request id) or text.")
    audit_log: Path | None = Field(
        None, description="JSONL file recording every scored item (ids, scores, rewards, reasoning, latency)."
    )
    audit_log_max_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Size at which the audit log rotates (5 old files are kept)."
    )

    # scoring
    score_mode: ScoreMode = Field(
        "argmax",
        description="What feeds the reward by default: 'argmax' (the written score, as in the paper) or "
        "'expected' (probability-weighted mean over the score tokens; smoother rewards).",
    )
    cme_w1: float = Field(0.6, ge=0.0, description="CME editing reward: constant weight w1 (divided by w1 + w2).")
    cme_w2: float = Field(0.4, ge=0.0, description="CME editing reward: consistency weight w2 (divided by w1 + w2).")
    qma_w1: float = Field(0.4, ge=0.0, description="QMA generation reward: constant weight w1 (divided by w1 + w2).")
    qma_w2: float = Field(0.6, ge=0.0, description="QMA generation reward: quality weight w2 (divided by w1 + w2).")

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
        QWEN3_VL_MAX_PIXELS,
        ge=64,
        description="Images over this many pixels are downscaled before judging. The default is the Qwen3-VL "
        "processor's own limit, so no image the critic would see whole is touched; lower it only to bound memory.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.cme_weights()
        self.qma_weights()
        try:
            keyed = self.key_ring().enabled  # a key file that holds no key counts as none
        except OSError as exc:
            raise ValueError(f"cannot read the API key file: {exc}") from exc
        if not is_loopback(self.host) and not keyed and not self.insecure:
            raise ValueError(
                f"binding {self.host} without API keys would let anyone score; set --api-keys or --api-key-file, "
                "or pass --insecure if the network is trusted"
            )
        if self.edit_model == SWITCHED_OFF and self.gen_model == SWITCHED_OFF:
            raise ValueError("both models are switched off; at least one of --edit-model/--gen-model is needed")
        return self

    def key_ring(self) -> KeyRing:
        keys = load_keys(self.api_keys.get_secret_value() if self.api_keys else None, self.api_key_file)
        admin = self.admin_key.get_secret_value() if self.admin_key else None
        return KeyRing(scoring=keys, admin=admin, protect_metrics=self.protect_metrics)

    def base_urls(self) -> list[str]:
        return [u.strip() for u in (self.openai_base_urls or "").split(",") if u.strip()]

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
