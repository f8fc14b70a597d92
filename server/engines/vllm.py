"""In-process vLLM engine: `AsyncLLM` with continuous batching across concurrent requests.

Each judge call is submitted on its own and vLLM schedules them together, so no micro-batcher
sits in front. Decoding is greedy with an explicit seed; the probabilities of the watched
tokens come from `logprob_token_ids` at every step. As `LLM.generate` does, a call asks vLLM for
its final output only, and for token ids without text: vLLM then neither builds an output at every
step nor detokenizes the answer and the watched tokens step by step; the answer is decoded once here.
Prefix caching is on by default: the images open every prompt, so a GRPO group reuses its shared
source image once a step has computed it. With group prefill (server.engines.prefill_order, off by
default) the calls of a request that share an opening wait for the first of them to prefill it, so
that they find it cached even on the group's first scoring.
vllm is imported in `start` (or when the engine is built with batch invariance, to refuse it
early where this vLLM cannot), never at module import.

Batch invariance is vLLM's own mode, switched on by its VLLM_BATCH_INVARIANT environment variable
before the engine starts; vLLM 0.32 runs it on NVIDIA GPUs of compute capability 8.0 or newer, AMD
Instinct GPUs and Intel XPUs, and not on its CPU build.

A request vLLM refuses (too long, too many images) or fails alone becomes that call's error; a dead
engine raises, so the whole batch fails and readiness counts it. vLLM's scheduler reports, per
engine step, how many requests run together and how many prompt tokens the prefix cache served:
both go to the server's /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import math
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from foundation.daemon import run_in_daemon
from server.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    MemoryPlan,
    PromptPart,
    cuda_available,
)
from server.engines.prefill_order import image_tokens, prefill_leaders
from server.engines.tokens import chat_content, single_token_ids, watched_steps
from server.images import DIGEST_KEY

log = logging.getLogger(__name__)

_RUNNING_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class _Series:
    running: Histogram
    prefix_queries: Counter
    prefix_hits: Counter
    max_num_seqs: Gauge
    max_num_batched_tokens: Gauge


_SERIES: weakref.WeakKeyDictionary[CollectorRegistry, _Series] = weakref.WeakKeyDictionary()


def _series(registry: CollectorRegistry) -> _Series:
    """The engine series of one registry, shared by every vllm engine that reports to it."""
    if registry not in _SERIES:
        _SERIES[registry] = _Series(
            Histogram(
                "firm_vllm_running_requests",
                "Requests vLLM ran together in one engine step (continuous batching).",
                ["model"],
                buckets=_RUNNING_BUCKETS,
                registry=registry,
            ),
            Counter(
                "firm_vllm_prefix_cache_queries",
                "Prompt tokens looked up in vLLM's prefix cache.",
                ["model"],
                registry=registry,
            ),
            Counter(
                "firm_vllm_prefix_cache_hits", "Prompt tokens vLLM's prefix cache served.", ["model"], registry=registry
            ),
            Gauge(
                "firm_vllm_max_num_seqs",
                "The most requests vLLM runs in one engine step (--max-num-seqs, as the engine resolved it).",
                ["model"],
                registry=registry,
            ),
            Gauge(
                "firm_vllm_max_num_batched_tokens",
                "The most tokens vLLM computes in one engine step (--max-num-batched-tokens, as resolved).",
                ["model"],
                registry=registry,
            ),
        )
    return _SERIES[registry]


def _stat_logger(series: _Series, label: str) -> Callable[..., Any]:
    """A vLLM stat-logger factory that feeds `series`. Giving one turns vLLM's per-step stats on: its
    periodic log lines stay off, but it also keeps its own Prometheus series, on its global registry,
    which this server does not expose (a second engine in the process re-registers them)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerSeries(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is None:
                return
            if scheduler_stats.num_running_reqs:
                series.running.labels(model=label).observe(scheduler_stats.num_running_reqs)
            cache = scheduler_stats.prefix_cache_stats
            series.prefix_queries.labels(model=label).inc(cache.queries)
            series.prefix_hits.labels(model=label).inc(cache.hits)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerSeries


def batch_invariance_problem() -> str | None:
    """Why the installed vLLM cannot run batch-invariant here, or None when it can."""
    try:
        import vllm
        import vllm.envs
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"vllm cannot be imported ({exc})"
    offered = "VLLM_BATCH_INVARIANT" in getattr(vllm.envs, "environment_variables", {}) or (
        importlib.util.find_spec("vllm.model_executor.layers.batch_invariant") is not None  # older vLLM
    )
    if not offered:
        return f"vLLM {vllm.__version__} has no batch-invariant mode (VLLM_BATCH_INVARIANT)"
    if current_platform.is_cuda():
        if current_platform.has_device_capability((8, 0)):
            return None
        capability = current_platform.get_device_capability()
        return f"vLLM's batch-invariant mode needs an NVIDIA GPU of compute capability 8.0 or newer, not {capability}"
    if current_platform.is_rocm() or current_platform.is_xpu():
        return None
    return (
        f"vLLM {vllm.__version__} offers its batch-invariant mode on NVIDIA GPUs (compute capability 8.0 or newer), "
        f"AMD Instinct GPUs and Intel XPUs, not on this {current_platform.device_type} build"
    )


class VLLMEngine(Engine):
    batches_itself: ClassVar[bool] = True
    supports_constraints: ClassVar[bool] = True
    supports_batch_invariance: ClassVar[bool] = True  # where the installed vLLM has the mode: checked when built
    loads_checkpoint: ClassVar[bool] = True
    name: ClassVar[str] = "vllm"

    def __init__(
        self,
        model: str,
        watch_tokens: Sequence[str],
        *,
        revision: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int = 16384,
        gpu_memory_utilization: float = 0.42,
        tensor_parallel_size: int = 1,
        images_per_prompt: int = 2,
        prefix_caching: bool = True,
        group_prefill: bool = False,
        sleep_mode: bool = False,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        registry: CollectorRegistry | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, watch_tokens, revision=revision, **options)
        if self.batch_invariant and (problem := batch_invariance_problem()) is not None:
            raise ValueError(
                f"--batch-invariant: {problem}; leave it off here, or serve with --engine transformers, "
                "which runs each call alone"
            )
        self._series = _series(registry if registry is not None else CollectorRegistry())
        self.engine_args: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            # The checkpoint's own processor settings size the images, as in the transformers engine,
            # so both see the same pixel grid; the server's pixel budget guards memory before that.
            "limit_mm_per_prompt": {"image": images_per_prompt, "video": 0},
            "enable_prefix_caching": prefix_caching,
            "enable_sleep_mode": sleep_mode,
            "enforce_eager": enforce_eager,
            "disable_log_stats": True,
        }
        # unset, vLLM's defaults for offline batches (`LLM`), which `start` asks for: scoring is batch work
        limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        self.engine_args.update({k: v for k, v in limits.items() if v is not None})
        self.supports_sleep = sleep_mode  # without it vLLM refuses to sleep: answer 409, not 500
        if sleep_mode:
            # The multimodal processor cache can hand back stale entries after a wake-up, which
            # silently changes scores; with sleep on it is switched off.
            self.engine_args["mm_processor_cache_gb"] = 0
        self.seed = seed
        on_gpu = cuda_available()
        self._memory = MemoryPlan(
            device="cuda" if on_gpu else "cpu",
            dtype="bfloat16" if dtype == "auto" else dtype,  # auto: the checkpoint's own, bfloat16 for Qwen3-VL
            batch=int(options.get("max_batch_size") or 1),
            share=gpu_memory_utilization if on_gpu else None,
        )
        self.group_prefill = group_prefill and prefix_caching
        self._llm: Any = None
        self._tokenizer: Any = None
        self._block_tokens = 0
        self._pixels_per_token = 0
        self._max_image_pixels: int | None = None
        self._processor: Any = None
        self._watch_ids: list[int] = []

    def memory_plan(self) -> MemoryPlan:
        return self._memory

    def use_files(self, folder: Path, commit: str | None) -> None:
        super().use_files(folder, commit)
        self.engine_args.update(model=str(folder), revision=None)

    async def start(self) -> None:
        from transformers import AutoProcessor
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # daemon threads: a process told to stop mid-load exits without waiting for the load
        await run_in_daemon(self._check_context, name="vllm context check")
        if self.batch_invariant:
            # read when vLLM builds its engine (and frozen after): set before the first engine of the process starts
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        log.info("starting vLLM for %s: %s (batch-invariant: %s)", self.model, self.engine_args, self.batch_invariant)
        # Construction waits until the engine is ready (weights loaded, maybe downloaded): off the
        # event loop, so /healthz keeps answering meanwhile.
        self._llm = await run_in_daemon(
            functools.partial(
                AsyncLLM.from_engine_args,
                AsyncEngineArgs(**self.engine_args),
                # The step limits `LLM.generate` gets, not the smaller ones of an embedded engine: a reward
                # server scores batches, as offline (docs/operations.md lists them).
                usage_context=UsageContext.LLM_CLASS,
                stat_loggers=[_stat_logger(self._series, self.model)],
            ),
            name=f"load {self.model}",
        )
        # The checkpoint's own chat template renders the prompt, as the transformers engine does.
        self._processor = await run_in_daemon(
            functools.partial(AutoProcessor.from_pretrained, self.load_from, revision=self.engine_args["revision"]),
            name=f"processor {self.model}",
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._watch_ids = single_token_ids(self._tokenizer, self.watch_tokens, self.model)
        self._block_tokens = self._llm.vllm_config.cache_config.block_size
        scheduler = self._llm.vllm_config.scheduler_config
        self._series.max_num_seqs.labels(model=self.model).set(scheduler.max_num_seqs)
        self._series.max_num_batched_tokens.labels(model=self.model).set(scheduler.max_num_batched_tokens)
        log.info(
            "vLLM for %s runs up to %d requests and %d tokens a step",
            self.model, scheduler.max_num_seqs, scheduler.max_num_batched_tokens,
        )  # fmt: skip
        # Qwen-VL processors: a token per merged patch, up to their pixel limit; another: every image fills a block
        images = getattr(self._processor, "image_processor", None)
        patch, merge = getattr(images, "patch_size", None), getattr(images, "merge_size", None)
        self._pixels_per_token = (patch * merge) ** 2 if isinstance(patch, int) and isinstance(merge, int) else 1
        size = getattr(images, "size", None)
        most = getattr(images, "max_pixels", None) or (size.get("longest_edge") if isinstance(size, dict) else None)
        self._max_image_pixels = most if isinstance(most, int) else None

    def _check_context(self) -> None:
        """Refuse, in words, a context longer than the model's own, which vLLM would refuse in a traceback."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.load_from, revision=self.engine_args["revision"])
        longest = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        wanted = self.engine_args["max_model_len"]
        if longest is not None and wanted > longest:
            raise EngineError(
                f"--max-model-len {wanted} is more than {self.model}'s context of {longest} tokens: lower "
                "--image-pixel-budget or the answer budgets (the default context follows them), or set --max-model-len"
            )

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def sleep(self) -> None:
        # "wait" lets running calls finish; vLLM's default aborts them
        await self._llm.sleep(level=1, mode="wait")

    async def wake(self) -> None:
        await self._llm.wake_up()
        await self._llm.reset_prefix_cache()

    def _sampling_params(self, request: GenerationRequest, *, stream: bool = False) -> Any:
        """Greedy, with the watched tokens' log-probs at every step, token ids only (the answer is decoded
        once, in `answer`); the final output alone, or with `stream` every step's new tokens (a call
        that others wait on says so when its prefill is done)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if request.constraint is not None:
            c = request.constraint
            structured = (
                StructuredOutputsParams(json=c.json_schema)
                if c.json_schema is not None
                else StructuredOutputsParams(regex=c.regex)
            )
        return SamplingParams(
            temperature=0.0,
            seed=self.seed,
            max_tokens=request.max_new_tokens,
            logprob_token_ids=self._watch_ids,
            structured_outputs=structured,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        if self._llm is None:
            raise EngineError("engine is not started")
        calls = [r.parts for r in requests]
        if self.group_prefill:
            leaders = prefill_leaders(calls, self._opening_tokens, self._block_tokens)
        else:
            leaders = [None] * len(calls)
        prefilled = {i: asyncio.Event() for i in set(leaders) if i is not None}

        async def run(index: int) -> GenerationResult | EngineError:
            if (leader := leaders[index]) is not None:
                await prefilled[leader].wait()
            return await self._one(requests[index], prefilled.get(index))

        return list(await asyncio.gather(*(run(i) for i in range(len(requests)))))

    def _opening_tokens(self, parts: Sequence[PromptPart]) -> int:
        """A floor on the prompt tokens of an opening: its images' (the text is short beside them)."""
        images = [p for p in parts if not isinstance(p, str)]
        return sum(image_tokens(p, self._pixels_per_token, self._max_image_pixels) for p in images)

    async def _one(self, request: GenerationRequest, prefilled: asyncio.Event | None) -> GenerationResult | EngineError:
        """One call; `prefilled`, when given, is set once its prompt is prefilled (or it ended)."""
        content, images = chat_content(request.parts)
        prompt = self._processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        inputs: dict[str, Any] = {"prompt": prompt}
        if images:
            inputs["multi_modal_data"] = {"image": images}
            inputs["multi_modal_uuids"] = {"image": image_identities(images)}
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineGenerateError

        params = self._sampling_params(request, stream=prefilled is not None)
        ids: list[int] = []
        steps: list[Any] = []
        finish_reason = None
        try:
            async for output in self._llm.generate(inputs, params, request_id=uuid.uuid4().hex):
                if prefilled is not None:
                    prefilled.set()
                if output.outputs:  # the final output, or with `prefilled` one step's new tokens
                    completion = output.outputs[0]
                    ids.extend(completion.token_ids)
                    steps.extend(completion.logprobs or ())
                    finish_reason = completion.finish_reason
        except VLLMClientError as exc:  # refused: too long, too many images
            return EngineError(f"vllm refused the request: {exc}")
        except EngineGenerateError as exc:  # this request failed; the engine lives on (EngineDeadError raises)
            return EngineError(f"vllm failed the request: {exc.__cause__ or exc}")
        finally:
            if prefilled is not None:
                prefilled.set()  # whatever happened, the calls waiting on this one go
        if finish_reason is None:
            return EngineError("vllm returned no output")
        if finish_reason == "abort":  # stopped before the end: not an answer to judge
            return EngineError("vllm aborted the request")
        if len(steps) != len(ids):  # misaligned log-probs would read the score's probabilities off another token
            return EngineError(f"vllm gave log-probs for {len(steps)} of {len(ids)} tokens")
        return answer(self._tokenizer, ids, steps, finish_reason, self._watch_ids, self.watch_tokens)


def image_identities(images: Sequence[Image.Image]) -> list[str | None]:
    """vLLM's key for each image in its caches: the digest of the bytes the server decoded it from, so vLLM
    need not hash the pixels of every call (for a 512-pixel image that costs more than decoding it); None,
    for an image made in-process, leaves vLLM to hash it. Within one process the same bytes always decode
    to the same pixels (the pixel budget is the process's own), which is what vLLM asks of the key."""
    return [image.info.get(DIGEST_KEY) for image in images]


def answer(
    tokenizer: Any,
    ids: Sequence[int],
    steps: Sequence[dict[int, Any]],
    finish_reason: str,
    watch_ids: Sequence[int],
    watch_tokens: Sequence[str],
) -> GenerationResult:
    """The result of a finished call from its token ids and each step's log-probs (token id -> an object
    with `.logprob`): the text decoded once, as vLLM's detokenizer gives it (special tokens skipped)."""

    def probs_at(step: int) -> list[float]:
        entry = steps[step] if step < len(steps) else {}
        return [math.exp(entry[i].logprob) if i in entry else 0.0 for i in watch_ids]

    return GenerationResult(
        text=tokenizer.decode(list(ids), skip_special_tokens=True),
        watched=watched_steps(tokenizer, ids, watch_ids, watch_tokens, probs_at),
        finished=finish_reason != "length",
    )
