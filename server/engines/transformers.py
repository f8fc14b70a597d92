"""In-process engine on Hugging Face transformers: batched greedy `generate`, CPU or GPU; one call at a
time where the same input must get the same answer whatever shares its batch.

Loads any Qwen3-VL style checkpoint (hub id or local folder) through AutoProcessor and
AutoModelForImageTextToText. Score-token probabilities are recorded by a logits processor
that keeps only the watched tokens at each step, so memory stays small even for a large vocab.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from foundation.daemon import run_in_daemon
from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult, MemoryPlan, cuda_available
from server.engines.tokens import chat_content, single_token_ids, watched_steps

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if cuda_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


class _WatchRecorder:
    """A logits processor that records the probabilities of the watched tokens at each step."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.steps: list[Any] = []  # one [batch, len(token_ids)] tensor per generated token

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float(), dim=-1)[:, self.token_ids]
        self.steps.append(probs.cpu())
        return scores


class _StopCancelled:
    """A stopping criterion: rows whose request was cancelled stop generating (all gone: the batch stops)."""

    def __init__(self, requests: list[GenerationRequest]) -> None:
        self.requests = requests

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor([r.cancelled.is_set() for r in self.requests], device=input_ids.device)


class TransformersEngine(Engine):
    """Batch invariance (`batch_invariant=True`) runs each call alone. Grouping calls of equal length, so that
    no row is padded, is not enough: the CPU's and the GPU's matrix-product kernels pick their reduction order
    by the number of rows, so a decoding step of 1, 2 or 8 rows gives the same row different low bits."""

    batches_itself: ClassVar[bool] = False
    supports_batch_invariance: ClassVar[bool] = True
    supports_sleep = True
    loads_checkpoint: ClassVar[bool] = True
    name: ClassVar[str] = "transformers"

    def __init__(
        self,
        model: str,
        watch_tokens: Sequence[str],
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__(model, watch_tokens, revision=revision, **options)
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self._model: Any = None
        self._processor: Any = None
        self._watch_ids: list[int] = []
        self._lock = asyncio.Lock()

    @property
    def revision(self) -> str | None:
        if self._revision:
            return self._revision
        return getattr(getattr(self._model, "config", None), "_commit_hash", None)

    def memory_plan(self) -> MemoryPlan:
        dtype = str(resolve_dtype(self.dtype_name, self.device)).removeprefix("torch.")
        batch = 1 if self.batch_invariant else int(self.options.get("max_batch_size") or 1)
        return MemoryPlan(device=self.device, dtype=dtype, batch=batch)

    async def warm_up(self) -> bool:
        """One short call on a small blank image: the first forward pass's setup happens here."""
        from PIL import Image

        (result,) = await self.generate([GenerationRequest(parts=(Image.new("RGB", (64, 64)), "1"), max_new_tokens=1)])
        if isinstance(result, EngineError):
            raise result
        return True

    async def start(self) -> None:
        # a daemon thread: a process told to stop mid-load exits without waiting for the load
        await run_in_daemon(self._load, name=f"load {self.model}")

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.device == "cpu" and (cores := os.cpu_count() or 1) > 1 and torch.get_num_threads() >= cores:
            # leave a core to the event loop, which parses requests and refuses overload meanwhile
            torch.set_num_threads(cores - 1)
        log.info("loading %s on %s", self.model, self.device)
        processor = AutoProcessor.from_pretrained(self.load_from, revision=self._revision)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(
            self.load_from, revision=self._revision, dtype=resolve_dtype(self.dtype_name, self.device)
        )
        model.to(self.device).eval()
        watch_ids = single_token_ids(processor.tokenizer, self.watch_tokens, self.model)
        self._processor, self._model, self._watch_ids = processor, model, watch_ids

    async def sleep(self) -> None:
        """Move the weights to host memory so a trainer on the same GPU can use it."""
        async with self._lock:
            await asyncio.to_thread(self._place, "cpu")

    async def wake(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._place, self.device)

    def _place(self, device: str) -> None:
        import torch

        self._model.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def batch_limit(self) -> int | None:
        return 1 if self.batch_invariant else None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        if self._model is None:
            raise EngineError("engine is not started")
        run = self._generate_each if self.batch_invariant else self._generate
        async with self._lock:  # one batch at a time on the model
            return await asyncio.to_thread(run, list(requests))

    def _generate_each(self, requests: list[GenerationRequest]) -> list[GenerationResult | EngineError]:
        """Each call alone, so its tensors have the same shapes whatever came with it; one abandoned before
        its turn is not run."""
        results: list[GenerationResult | EngineError] = []
        for request in requests:
            if request.cancelled.is_set():
                results.append(EngineError("the call was abandoned before it ran"))
            else:
                results += self._generate([request])
        return results

    def _inputs(self, requests: list[GenerationRequest]) -> Any:
        texts, images = [], []
        for request in requests:
            content, request_images = chat_content(request.parts)
            images += request_images
            texts.append(
                self._processor.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
            )
        return self._processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers import GenerationConfig

        inputs = self._inputs(requests)
        tokenizer = self._processor.tokenizer
        recorder = _WatchRecorder(self._watch_ids)
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(r.max_new_tokens for r in requests),
            eos_token_id=list(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            sequences = self._model.generate(
                **inputs,
                generation_config=config,
                logits_processor=[recorder],
                stopping_criteria=[_StopCancelled(requests)],
            )
        generated = sequences[:, inputs["input_ids"].shape[1] :].tolist()
        return [
            self._result(row, ids[: request.max_new_tokens], recorder, eos_ids)
            for row, (ids, request) in enumerate(zip(generated, requests, strict=True))
        ]

    def _result(self, row: int, ids: list[int], recorder: _WatchRecorder, eos_ids: set[int]) -> GenerationResult:
        tokenizer = self._processor.tokenizer
        finished = False
        for end, token_id in enumerate(ids):
            if token_id in eos_ids:
                ids, finished = ids[:end], True
                break
        watched = watched_steps(
            tokenizer, ids, self._watch_ids, self.watch_tokens, lambda step: recorder.steps[step][row].tolist()
        )
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationResult(text=text, watched=watched, finished=finished)
