"""All configuration of the server in one typed object.

Values come from, highest priority first: command-line flags, `FIRM_*` environment variables,
the defaults below. Every field's description is its `--help` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clients.protocol import (
    MAX_INSTRUCTION_CHARS,
    MAX_ITEMS_PER_REQUEST,
    MAX_PROMPT_CHARS,
    RewardWeights,
    ScoreMode,
    ScoringDefaults,
    Task,
)
from foundation.cache import default_cache_dir
from foundation.flags import flag
from server.images import QWEN3_VL_MAX_PIXELS, ImageLimits, max_vision_tokens
from server.judges import JUDGES
from server.prompts.release import DEFAULT_SOURCE
from server.prompts.sets import prompt_set
from server.security import KeyRing, is_loopback, load_keys
from server.tasks import SERVER_TASKS

SWITCHED_OFF = "none"  # the model setting that switches a critic off (its state is then "disabled")
TINY_MODEL_NAME = "tiny-random"  # the name --tiny's critic is served under: no released checkpoint


# Room for the longest judge prompt: the template (under 2,000 tokens for the release's) and the request's text
# (at most MAX_PROMPT_CHARS + MAX_INSTRUCTION_CHARS characters, at two or more characters a token).
TEMPLATE_TOKENS = 2048
TEXT_TOKENS = (MAX_PROMPT_CHARS + MAX_INSTRUCTION_CHARS) // 2


TYPICAL_PIXELS = 1024 * 1024  # a typical image of an RL rollout, for the memory estimate of a full batch


def _context_needed(task: Task, pixel_budget: int, max_new_tokens: int, *, text: bool = True) -> int:
    images = SERVER_TASKS[task].images_per_prompt * max_vision_tokens(pixel_budget)
    return images + TEMPLATE_TOKENS + (TEXT_TOKENS if text else 0) + max_new_tokens


def _default_context() -> int:
    return max(_context_needed(t, QWEN3_VL_MAX_PIXELS, task.max_new_tokens) for t, task in SERVER_TASKS.items())


def _task_settings() -> dict[str, Any]:
    """Each critic's settings, made from the task table so a new critic gets its flags with its entry:
    model and revision, answer budget, GPU share, remote model name, reward weights and templates."""
    fields: dict[str, Any] = {}
    for task in SERVER_TASKS.values():
        name, spec = task.name, task.spec
        reward, secondary = spec.reward, spec.dimensions[1].replace("_", " ")
        fields[f"{name}_model"] = (
            str,
            Field(
                task.checkpoint,
                description=f"{task.checkpoint.split('/')[-1]} or another {spec.title} critic (hub id or local "
                f"folder) for /v1/{name}/*; '{SWITCHED_OFF}' switches it off.",
            ),
        )
        fields[f"{name}_revision"] = (
            str | None,
            Field(None, description=f"Hub revision (branch, tag or commit) of the {name} model."),
        )
        fields[f"{name}_max_new_tokens"] = (
            int,
            Field(
                task.max_new_tokens,
                ge=8,
                description=f"Most tokens a {name} judge may write per answer (the release's budget: "
                f"{task.max_new_tokens}).",
            ),
        )
        fields[f"{name}_gpu_memory_utilization"] = (
            float,
            Field(0.42, gt=0.0, le=0.95, description=f"vllm: share of GPU memory for the {name} critic."),
        )
        fields[f"openai_{name}_model"] = (
            str | None,
            Field(
                None,
                description=f"openai: model name the remote server serves the {name} critic as "
                f"(default: {flag(name + '_model')}).",
            ),
        )
        for weight, what, value in (
            ("w1", "constant", spec.default_weights.w1),
            ("w2", secondary, spec.default_weights.w2),
        ):
            fields[f"{reward.lower()}_{weight}"] = (
                float,
                Field(
                    value,
                    ge=0.0,
                    description=f"{reward} {spec.title} reward: {what} weight {weight} (divided by w1 + w2).",
                ),
            )
        for judge in task.judges:
            fields[f"{judge}_template"] = (
                Path | None,
                Field(None, description=f"Template file replacing the {judge.replace('_', ' ')} prompt."),
            )
    return fields


_TaskSettings: type[BaseSettings] = create_model("_TaskSettings", __base__=BaseSettings, **_task_settings())


class Settings(_TaskSettings):  # type: ignore[misc,valid-type]
    model_config = SettingsConfigDict(env_prefix="FIRM_", extra="forbid")

    # models (each critic's own settings come from the task table: see `_task_settings`)
    tiny: bool = Field(
        False,
        description="Serve a tiny randomly initialised critic built locally (no download) for every enabled task. "
        "Its scores are meaningless: for smoke tests only.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the --tiny checkpoint is built and the release's prompt files are kept.",
    )

    hub_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Tries after the first when the hub cannot be reached or fails (1, 2, 4 s apart); a model "
        "that is not found or gated fails at once. Past them the model is 'failed' in /readyz, with the reason.",
    )
    hub_timeout_s: float = Field(10.0, gt=0.0, description="Time limit of one call to the hub, in seconds.")
    force: bool = Field(
        False,
        description="Load the critics even when the memory check says they will not fit this machine's memory "
        "(the check compares parameters x dtype size + cache + runtime with what the device has).",
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
    batch_invariant: bool = Field(
        False,
        description="Give an item the same answer, scores and expected values, to the bit, whatever else shares "
        "its batch and whatever the arrival order (same machine and software). transformers: each judge call runs "
        "alone, which gives up batching (several times lower throughput); vllm: vLLM's own batch-invariant mode, "
        "on NVIDIA GPUs of compute capability 8.0 or newer, AMD Instinct or Intel XPU (slower kernels), refused "
        "elsewhere, as on vLLM's CPU build; refused with the openai engine, whose server decides.",
    )

    # vllm engine
    max_model_len: int | None = Field(
        None,
        ge=512,
        description="vllm: longest prompt + answer, in tokens. Unset, it is derived so that any image the server "
        "accepts can be scored: each task's images at --image-pixel-budget, the longest judge prompt and its "
        f"answer budget ({_default_context():,} at the defaults). Lowering --image-pixel-budget or the answer "
        "budgets lowers it. A value set here that cannot hold a task's images at the pixel budget, its template and "
        "its answer budget is refused at start-up; a caller's text too long for it fails that item alone.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs each critic is split across.")
    prefix_caching: bool = Field(
        True, description="vllm: reuse the shared prompt prefix (images + rubric) across a GRPO group."
    )
    group_prefill: bool = Field(
        False,
        description="vllm, with prefix caching: calls of one request that open with the same images (a GRPO "
        "group's source) wait for the first of them to prefill that opening, then reuse it from the cache. "
        "More prompt tokens come from the cache, but the waits cost latency; off, it measured faster on the CPU "
        "build (docs/benchmarks.md).",
    )
    sleep_mode: bool = Field(
        False,
        description="vllm: allow POST /v1/admin/sleep to offload weights and free the GPU; turns the "
        "multimodal processor cache off, which would otherwise give stale inputs after a wake-up.",
    )
    enforce_eager: bool = Field(False, description="vllm: skip CUDA graph capture (faster start, slower runs).")
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="vllm: the most calls in one engine step. Unset, vLLM's default for offline LLM.generate on the "
        "device, not the smaller one it gives an embedded engine (docs/operations.md, vLLM); /metrics shows the "
        "value in use.",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="vllm: the most tokens one engine step computes (prefill chunks included). Unset, vLLM's "
        "default for offline LLM.generate on the device; /metrics shows the value in use.",
    )

    # openai engine
    openai_base_urls: str | None = Field(
        None,
        description="openai: comma-separated base URLs of OpenAI-compatible servers, e.g. "
        "http://gpu1:8001/v1,http://gpu2:8001/v1; calls go to the one with the fewest in flight.",
    )
    openai_api_key: SecretStr | None = Field(None, description="openai: bearer key for those servers.")
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

    # watch page and canaries
    watch_samples: int = Field(
        200,
        ge=0,
        le=2000,
        description="Recent scored items /watch lists, with thumbnails of at most 128 pixels (about 50 KB of memory "
        "each), kept in memory only and never written anywhere; 0 turns the list off.",
    )
    watch_window_s: float = Field(
        300.0, gt=0.0, description="The window /watch and the saturation gauges compare with the baseline, seconds."
    )
    watch_baseline_s: float = Field(
        3600.0,
        gt=0.0,
        description="The baseline: what is scored in this many seconds after start, until POST "
        "/v1/admin/watch/baseline pins the last window instead.",
    )
    canary_every: float = Field(
        600.0,
        ge=0.0,
        description="Score the canary set every this many seconds (it is also scored at start and after every "
        "wake); 0 leaves only those.",
    )
    canary_reference: Path | None = Field(
        None,
        description="JSON file of the canaries' reference answers (as /watch/data shows them); unset, the first "
        "answers are the reference.",
    )
    canary_set: Path | None = Field(
        None,
        description="JSON file of your own canaries with the scores they must get, added to the synthetic ones: "
        '{"items": [{"task", "id", "images": [paths], "text", "scores": {dimension: 1-5}}]}.',
    )
    canary_tolerance: float = Field(
        0.05,
        ge=0.0,
        description="How far a canary's expected value may move from its reference before the model is "
        "degraded; its written score must match exactly.",
    )
    canary_fail_readiness: bool = Field(
        False, description="A degraded model (canary drift) fails /readyz; by default it is shown there but ready."
    )
    canaries: bool = Field(True, description="Score the canary set at all; --no-canaries turns it off.")

    # scoring
    score_mode: ScoreMode = Field(
        "argmax",
        description="What feeds the reward by default: 'argmax' (the written score, as in the paper) or "
        "'expected' (probability-weighted mean over the score tokens; smoother rewards).",
    )

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

    @field_validator("prompts")
    @classmethod
    def _prompt_set(cls, value: str) -> str:
        return prompt_set(value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for task in SERVER_TASKS:
            self.weights(task)
        try:
            keyed = self.key_ring().enabled  # a key file that holds no key counts as none
        except OSError as exc:
            raise ValueError(f"cannot read the API key file: {exc}") from exc
        if not is_loopback(self.host) and not keyed and not self.insecure:
            raise ValueError(
                f"binding {self.host} without API keys would let anyone score; set --api-keys or --api-key-file, "
                "or pass --insecure if the network is trusted"
            )
        if not self.enabled_tasks():
            flags = "/".join(flag(f"{task}_model") for task in SERVER_TASKS)
            raise ValueError(f"every model is switched off; at least one of {flags} is needed")
        return self

    def key_ring(self) -> KeyRing:
        keys = load_keys(self.api_keys.get_secret_value() if self.api_keys else None, self.api_key_file)
        admin = self.admin_key.get_secret_value() if self.admin_key else None
        return KeyRing(scoring=keys, admin=admin, protect_metrics=self.protect_metrics)

    def base_urls(self) -> list[str]:
        return [u.strip() for u in (self.openai_base_urls or "").split(",") if u.strip()]

    def _task_value(self, name: str) -> Any:
        return getattr(self, name)

    def enabled_tasks(self) -> list[Task]:
        """The tasks whose model is not switched off, in table order."""
        return [task for task in SERVER_TASKS if self._task_value(f"{task}_model") != SWITCHED_OFF]

    def served_name(self, task: Task) -> str:
        """The name `task`'s critic is served and reported under: the tiny critic's, else the checkpoint."""
        return TINY_MODEL_NAME if self.tiny else self.model_source(task)[0]

    def model_source(self, task: Task) -> tuple[str, str | None]:
        """(checkpoint, revision) of `task`'s critic as configured."""
        return self._task_value(f"{task}_model"), self._task_value(f"{task}_revision")

    def weights(self, task: Task) -> RewardWeights:
        reward = SERVER_TASKS[task].spec.reward.lower()
        return RewardWeights(w1=self._task_value(f"{reward}_w1"), w2=self._task_value(f"{reward}_w2"))

    def scoring_defaults(self) -> ScoringDefaults:
        """What a request that leaves its options out is scored with."""
        return ScoringDefaults(score_mode=self.score_mode, weights={task: self.weights(task) for task in SERVER_TASKS})

    def max_new_tokens(self, task: Task) -> int:
        return self._task_value(f"{task}_max_new_tokens")

    def gpu_memory_utilization(self, task: Task) -> float:
        return self._task_value(f"{task}_gpu_memory_utilization")

    def openai_model(self, task: Task) -> str | None:
        return self._task_value(f"openai_{task}_model")

    def context_needed(self, task: Task, *, text: bool = True) -> int:
        """Tokens the largest item `task` accepts can take: its images at the pixel budget, the longest
        judge prompt (without the request's own text when `text` is false), and the answer budget."""
        return _context_needed(task, self.image_pixel_budget, self.max_new_tokens(task), text=text)

    def typical_call(self, task: Task) -> int:
        """Tokens of a typical call of `task` (its images at about a megapixel, the template, the answer):
        what a full batch is estimated with before loading."""
        pixels = min(self.image_pixel_budget, TYPICAL_PIXELS)
        return _context_needed(task, pixels, self.max_new_tokens(task), text=False)

    def context_length(self) -> int:
        """--max-model-len as set, else the least that holds every enabled task's largest item."""
        if self.max_model_len is not None:
            return self.max_model_len
        return max(self.context_needed(task) for task in self.enabled_tasks())

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            pixel_budget=self.image_pixel_budget,
        )

    def template_overrides(self) -> dict[str, Path | None]:
        return {judge: self._task_value(f"{judge}_template") for judge in JUDGES}
