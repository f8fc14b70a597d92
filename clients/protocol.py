"""Wire protocol v1 of the FIRM reward server: one pydantic model per message.

The server validates requests with these classes and the client parses responses with them,
so this module is the single source of truth for the API. It depends on nothing of ours.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = "v1"

# Hard caps of the protocol. A server may be configured stricter, never looser.
MAX_ITEMS_PER_REQUEST = 256
MAX_GROUP_SIZE = 64
MAX_ID_CHARS = 128
MAX_INSTRUCTION_CHARS = 4_000
MAX_PROMPT_CHARS = 8_000
# 64 MiB of base64 text is 48 MiB of image bytes; servers cap far lower by default.
MAX_IMAGE_CHARS = 64 * 1024 * 1024
MAX_TIMEOUT_S = 86_400.0  # a caller's deadline: a day at most

ScoreMode = Literal["argmax", "expected"]
Task = Literal["edit", "gen"]  # the critics' tasks; their facts are in `clients.tasks`

ImageData = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_IMAGE_CHARS,
        description="PNG, JPEG or WebP bytes as a base64 string or a data:image/...;base64, URL.",
    ),
]
ItemId = Annotated[str, Field(max_length=MAX_ID_CHARS, description="Echoed back with the item's result.")]

ItemErrorCode = Literal[
    "invalid_image",
    "parse_error",
    "no_score_probabilities",
    "engine_error",
    "deadline",  # the caller's timeout_s passed before the item's judge calls finished
    "request_failed",  # set by the client when the request carrying the item failed after its retries
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardWeights(_Message):
    """Weights of a gated reward R = P * (w1 + w2 * S). As in the release, they are divided by w1 + w2
    (so 1/1 means 0.5/0.5) and the reward is clamped to [0, 1]; w1 + w2 must be positive."""

    w1: float = Field(ge=0.0, allow_inf_nan=False)
    w2: float = Field(ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _positive_sum(self) -> RewardWeights:
        if not self.w1 + self.w2 > 0.0:
            raise ValueError("w1 + w2 must be positive")
        return self


class ScoringDefaults(_Message):
    """A server's defaults for the options a request leaves out."""

    score_mode: ScoreMode = "argmax"
    weights: dict[str, RewardWeights] = Field(description="Default reward weights of each task.")


class ResolvedOptions(_Message):
    """A request's options with every default filled in: what the server scores with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_mode: ScoreMode
    weights: RewardWeights
    return_reasoning: bool


class _ScoringOptions(_Message):
    task: ClassVar[Task]

    weights: RewardWeights | None = Field(
        default=None, description="Reward weights for this request; the server's defaults when absent."
    )
    score_mode: ScoreMode | None = Field(
        default=None,
        description="'argmax' feeds the written 1-5 score to the reward, 'expected' the probability-weighted "
        "mean over the score tokens. The server's default when absent.",
    )
    return_reasoning: bool = Field(default=False, description="Include the judge's written reasoning.")
    timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description="The caller's deadline in seconds, from when the server has read and checked the request. "
        "Items whose judge calls have not finished by then fail with the error 'deadline' (their work is dropped) "
        "and the rest are answered; the server's own deadline (a 504 for the whole request) applies when it is "
        "the smaller.",
    )

    def resolve(self, defaults: ScoringDefaults) -> ResolvedOptions:
        """The options this request scores with: its own where given, else the server's for its task.

        >>> request = GenGroupRequest(prompt="a cat", images=["x"], score_mode="expected")
        >>> defaults = ScoringDefaults(weights={"gen": RewardWeights(w1=0.4, w2=0.6)})
        >>> options = request.resolve(defaults)
        >>> options.score_mode, options.weights.w2, options.return_reasoning
        ('expected', 0.6, False)
        """
        return ResolvedOptions(
            score_mode=self.score_mode or defaults.score_mode,
            weights=self.weights or defaults.weights[self.task],
            return_reasoning=self.return_reasoning,
        )


# ----------------------------------------------------------------------------- requests


class EditItem(_Message):
    id: ItemId | None = None
    source: ImageData
    edited: ImageData
    instruction: str = Field(min_length=1, max_length=MAX_INSTRUCTION_CHARS)


class EditScoreRequest(_ScoringOptions):
    task: ClassVar[Task] = "edit"

    items: list[EditItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class EditGroupRequest(_ScoringOptions):
    """A GRPO group: one source image and instruction, several edited candidates."""

    task: ClassVar[Task] = "edit"

    id: ItemId | None = None
    source: ImageData
    instruction: str = Field(min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    candidates: list[ImageData] = Field(min_length=1, max_length=MAX_GROUP_SIZE)


class GenItem(_Message):
    id: ItemId | None = None
    image: ImageData
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    requirement: str | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS)


class GenScoreRequest(_ScoringOptions):
    task: ClassVar[Task] = "gen"

    items: list[GenItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class GenGroupRequest(_ScoringOptions):
    """A GRPO group: one prompt, several generated images."""

    task: ClassVar[Task] = "gen"

    id: ItemId | None = None
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    requirement: str | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS)
    images: list[ImageData] = Field(min_length=1, max_length=MAX_GROUP_SIZE)


# ----------------------------------------------------------------------------- responses


class ItemError(_Message):
    code: ItemErrorCode
    message: str
    field: str | None = Field(default=None, description="The request field at fault, when there is one.")

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class DimensionScore(_Message):
    score: int | None = Field(default=None, ge=1, le=5, description="The integer the judge wrote.")
    expected: float | None = Field(
        default=None, ge=1.0, le=5.0, description="Probability-weighted mean over the score tokens."
    )
    normalized: float | None = Field(
        default=None, ge=0.0, le=1.0, description="(s - 1) / 4 of the score that feeds the reward."
    )
    reasoning: str | None = None


class QualitySubscores(_Message):
    aesthetics: int = Field(ge=1, le=5)
    technical_quality: int = Field(ge=1, le=5)
    structure_texture: int = Field(ge=1, le=5)


class QualityScore(DimensionScore):
    """Image quality: the minimum of the three subscores."""

    subscores: QualitySubscores | None = None


class EditResult(_Message):
    id: str
    execution: DimensionScore | None = None
    consistency: DimensionScore | None = None
    reward: float | None = Field(description="CME reward in [0, 1]; null when the item failed, never 0.")
    error: ItemError | None = None


class GenResult(_Message):
    id: str
    instruction_following: DimensionScore | None = None
    quality: QualityScore | None = None
    reward: float | None = Field(description="QMA reward in [0, 1]; null when the item failed, never 0.")
    error: ItemError | None = None


class ModelRef(_Message):
    name: str
    revision: str | None = None


class GroupStats(_Message):
    mean: float | None = Field(description="Mean reward over the scored candidates.")
    std: float | None = Field(description="Population standard deviation over the scored candidates.")
    advantages: list[float | None] = Field(description="(r - mean) / (std + eps); null for failed candidates.")
    scored: int = Field(description="How many candidates have a reward.")


class _ScoreResponse(_Message):
    model: ModelRef
    score_mode: ScoreMode
    weights: RewardWeights

    def rewards(self) -> list[float]:
        """Rewards in item order, NaN where an item failed (never 0)."""
        return [math.nan if r.reward is None else r.reward for r in self.results]  # type: ignore[attr-defined]

    def mask(self) -> list[bool]:
        """True where the item has a reward; use it to leave failed items out of a loss."""
        return [r.reward is not None for r in self.results]  # type: ignore[attr-defined]

    def errors(self) -> list[tuple[str, str]]:
        """(id, reason) of every failed item."""
        return [(r.id, str(r.error)) for r in self.results if r.error]  # type: ignore[attr-defined]


class EditScoreResponse(_ScoreResponse):
    results: list[EditResult]


class EditGroupResponse(_ScoreResponse):
    id: str | None = None
    results: list[EditResult]
    group: GroupStats


class GenScoreResponse(_ScoreResponse):
    results: list[GenResult]


class GenGroupResponse(_ScoreResponse):
    id: str | None = None
    results: list[GenResult]
    group: GroupStats


ScoringRequest = EditScoreRequest | EditGroupRequest | GenScoreRequest | GenGroupRequest
ScoringResponse = EditScoreResponse | EditGroupResponse | GenScoreResponse | GenGroupResponse


def failed_response(request: ScoringRequest, message: str) -> ScoringResponse:
    """The reply standing in for a request that failed whole (its retries ran out, or the answer was not
    the protocol's): every item without a reward and with a `request_failed` error, under the request's
    own options, resolved against its task's default weights. A training loop masks the items and goes on.

    >>> reply = failed_response(GenGroupRequest(id="g", prompt="a cat", images=["x", "y"]), "no server answered")
    >>> reply.mask(), reply.id, reply.weights.w2, reply.group.scored, str(reply.results[1].error)
    ([False, False], 'g', 0.6, 0, 'request_failed: no server answered')
    """
    from clients.tasks import TASKS  # the task table is made of this module's classes

    spec = TASKS[request.task]
    options = request.resolve(ScoringDefaults(weights={request.task: spec.default_weights}))
    error = ItemError(code="request_failed", message=message)
    is_group = isinstance(request, spec.group_request)
    if is_group:
        ids = [str(i) for i in range(len(getattr(request, spec.group_members)))]
    else:
        ids = [str(i) if item.id is None else item.id for i, item in enumerate(request.items)]  # type: ignore[union-attr]
    fields: dict[str, object] = {
        "model": ModelRef(name="unavailable"),
        "score_mode": options.score_mode,
        "weights": options.weights,
        "results": [spec.result(id=i, reward=None, error=error) for i in ids],
    }
    if not is_group:
        return spec.score_response.model_validate(fields)
    fields["id"] = request.id  # type: ignore[union-attr]
    fields["group"] = GroupStats(mean=None, std=None, advantages=[None] * len(ids), scored=0)
    return spec.group_response.model_validate(fields)


class JudgeCard(_Message):
    """One judge of a model: where its prompt came from and how long its answers may be."""

    name: str
    prompt_source: str = Field(description="The template's origin: the release's file#CONSTANT, a file, or packaged.")
    prompt_sha256: str = Field(description="SHA-256 of the released file the template was read from, else of the text.")
    prompt_verified: bool | None = Field(
        default=None, description="For the release's prompts: whether the file matched its pinned digest."
    )
    max_new_tokens: int


class ImageInput(_Message):
    """What the server does with the images it is sent, so a caller knows what the critic sees."""

    formats: list[str] = Field(description="Encodings accepted, as base64 or a data URL.")
    reencoded: Literal[False] = Field(
        default=False,
        description="The server never re-encodes: it decodes each image as sent, so the critic sees the pixels the "
        "caller's encoding kept (JPEG at quality 75 reproduces the release's scores; PNG keeps every pixel).",
    )
    pixel_budget: int = Field(description="Images over this many pixels are downscaled, keeping the aspect ratio.")
    max_image_bytes: int = Field(description="Largest encoded image accepted.")
    max_image_pixels: int = Field(description="Most pixels an image may have; larger ones are refused.")


class ModelCard(_Message):
    task: Task
    name: str
    revision: str | None = None
    engine: str
    engine_reason: str | None = Field(default=None, description="Why this engine serves the model.")
    state: str | None = Field(default=None, description="loading, ready, sleeping, failed, ... as in /readyz.")
    failure: str | None = Field(default=None, description="Why the model failed to load, and what to do about it.")
    dimensions: list[str]
    reward: str = Field(description="The reward this task's results carry (CME, QMA).")
    judges: list[JudgeCard] = Field(default_factory=list)
    images: ImageInput | None = Field(default=None, description="How the model's images are taken.")
    batch_invariant: bool = Field(
        default=False,
        description="True when an item's answer, scores and expected values are bit-identical whatever else "
        "shares its batch and whatever the arrival order (firm-serve --batch-invariant).",
    )


class ModelsResponse(_Message):
    models: list[ModelCard]


class HealthResponse(_Message):
    status: Literal["ok"] = "ok"


class ReadinessResponse(_Message):
    ready: bool
    models: dict[str, str] = Field(
        description="State of each task's model: loading, ready, sleeping, failed or disabled."
    )
    failures: dict[str, str] | None = Field(
        default=None, description="Why each failed model failed, and what to do about it."
    )
    detail: str | None = None


class ErrorBody(_Message):
    code: str
    message: str
    limit: int | None = Field(default=None, description="The limit that was exceeded, for 413 errors.")


class ErrorResponse(_Message):
    error: ErrorBody


class AdminResponse(_Message):
    models: dict[str, str] = Field(description="State of each task's model after the action.")
