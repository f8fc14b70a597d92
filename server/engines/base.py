"""The engine interface: chat prompts with images in, text and score-token probabilities out.

An engine knows nothing of FIRM, judges or rewards. It gets one user turn per request (images
and text in order), decodes greedily, and reports, for each generated token that is one of the
`watch_tokens` it was built with, where that token starts in the text and the probabilities the
model gave every watched token at that step. Judges use this to compute an expected score.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

PromptPart = Image.Image | str


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: the answer must match this JSON schema, or this regular expression."""

    json_schema: dict[str, Any] | None = None
    regex: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    parts: tuple[PromptPart, ...]
    max_new_tokens: int
    constraint: OutputConstraint | None = None  # honoured by engines with supports_constraints
    # Set when no one waits for the answer any more (deadline passed, client disconnected, and no other
    # request shares the call): an engine may stop early.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


@dataclass(frozen=True)
class WatchedStep:
    offset: int  # where the generated token starts in `GenerationResult.text`
    token: str  # the watched token that was generated
    probs: dict[str, float]  # probability of every watched token at this step


@dataclass(frozen=True)
class GenerationResult:
    text: str
    watched: tuple[WatchedStep, ...] = field(default=())
    finished: bool = True  # False when max_new_tokens cut the answer short

    def step_at(self, offset: int) -> WatchedStep | None:
        """The watched step whose token starts at `offset` in the text, if any."""
        for step in self.watched:
            if step.offset == offset:
                return step
        return None


def cuda_available() -> bool:
    """A CUDA device is visible (False where torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class MemoryPlan:
    """Where and how an engine holds its critic: what the memory check before loading weighs."""

    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # of the weights: float32, bfloat16, float16
    batch: int  # calls that may share one forward pass
    share: float | None = None  # of the device's total memory the engine keeps for itself; None: what it needs


class EngineError(RuntimeError):
    """The engine failed to produce an answer."""


class Engine(abc.ABC):
    """Base class of every engine, built-in or loaded with `--engine package.module:Class`.

    `batches_itself` says whether the engine schedules concurrent requests by itself (vLLM,
    a remote server): then the server hands it each request's calls directly. When False the
    server puts a micro-batcher in front that gathers concurrent calls into one `generate`.
    """

    batches_itself: ClassVar[bool] = False
    supports_constraints: ClassVar[bool] = False
    # Can make a call's answer bit-identical whatever else shares its batch (--batch-invariant)?
    supports_batch_invariance: ClassVar[bool] = False
    batch_invariant: bool = False  # is it on: set per instance from the settings
    supports_sleep: bool = False  # an engine may decide per instance (vllm: only with --sleep-mode)
    # Reads a checkpoint (a hub id or a folder) onto this machine: the server fetches it and checks memory first.
    loads_checkpoint: ClassVar[bool] = False
    name: ClassVar[str] = "engine"

    def __init__(
        self,
        model: str,
        watch_tokens: Sequence[str],
        *,
        revision: str | None = None,
        batch_invariant: bool = False,
        **options: Any,
    ) -> None:
        """`options` holds the server's engine settings (device, dtype, ...); take what you need."""
        self.model = model  # as the user named it (a hub id or a folder): what logs and messages say
        self.load_from = model  # where the weights are read: the server's fetched folder once it has one
        self.watch_tokens = tuple(watch_tokens)
        self._revision = revision
        # On only where asked for and honoured: the server refuses the setting for an engine that cannot.
        self.batch_invariant = batch_invariant and self.supports_batch_invariance
        self.options = options

    def batch_limit(self) -> int | None:
        """The most calls worth gathering into one `generate`, None when the settings decide.

        An engine that runs its calls one at a time says 1, so a micro-batcher neither waits to gather
        calls it gains nothing from nor holds them out of its queue, where a deadline drops them."""
        return None

    @property
    def revision(self) -> str | None:
        """The model revision that scored, echoed in every response."""
        return self._revision

    def use_files(self, folder: Path, commit: str | None) -> None:
        """Load from `folder`, where the server has fetched the checkpoint, rather than from the hub again;
        `commit` is the revision those files are, echoed in responses."""
        self.load_from = str(folder)
        self._revision = self._revision or commit

    def memory_plan(self) -> MemoryPlan | None:
        """How the critic will be held, for the memory check before loading; None for an engine that
        holds no weights here (a remote server) or cannot say."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open connections. Called once before the first `generate`."""

    async def warm_up(self) -> bool:
        """Do the first call's one-time work (kernels chosen, caches filled) before traffic arrives, so the
        first request does not pay for it; False for an engine with none to do."""
        return False

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    async def sleep(self) -> None:
        """Free the accelerator for someone else (weights offloaded) until `wake`."""
        raise EngineError(f"the {self.name} engine cannot sleep")

    async def wake(self) -> None:
        """Undo `sleep`."""
        raise EngineError(f"the {self.name} engine cannot sleep")

    @abc.abstractmethod
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        """Answer a batch: one entry per request, in order.

        An entry may be an EngineError for a request that failed on its own; raising fails the
        whole batch (the server then splits it in halves until the requests that break it run alone).
        """
