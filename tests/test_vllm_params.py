"""What the vllm engine asks of vLLM and what it makes of the answer, without vLLM: a stand-in `vllm`
package records the sampling parameters and plays the engine; the tiny critic's tokenizer decodes."""

from __future__ import annotations

import asyncio
import enum
import math
import sys
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from server.engines.base import GenerationRequest
from server.engines.prefill_order import prefill_leaders
from server.engines.vllm import VLLMEngine, answer
from server.judges import SCORE_TOKENS

ANSWER = "The square is red, as asked.\nScore: 4"


class OutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class Refused(Exception):
    pass


@dataclass
class Logprob:
    logprob: float


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A `vllm` whose SamplingParams records its arguments (returned, one dict per call)."""
    sent: list[dict[str, Any]] = []

    def sampling_params(**kwargs: Any) -> types.SimpleNamespace:
        sent.append(kwargs)
        return types.SimpleNamespace(**kwargs)

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.sampling_params": types.ModuleType("vllm.sampling_params"),
        "vllm.exceptions": types.ModuleType("vllm.exceptions"),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
        "vllm.v1.engine.exceptions": types.ModuleType("vllm.v1.engine.exceptions"),
    }
    modules["vllm"].SamplingParams = sampling_params  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].RequestOutputKind = OutputKind  # type: ignore[attr-defined]
    modules["vllm.sampling_params"].StructuredOutputsParams = dict  # type: ignore[attr-defined]
    modules["vllm.exceptions"].VLLMClientError = Refused  # type: ignore[attr-defined]
    modules["vllm.v1.engine.exceptions"].EngineGenerateError = Refused  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield sent


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _engine(tokenizer: Any, *, group_prefill: bool = False) -> VLLMEngine:
    engine = VLLMEngine("tiny", SCORE_TOKENS, group_prefill=group_prefill)
    engine._tokenizer = tokenizer
    engine._watch_ids = [tokenizer.encode(t, add_special_tokens=False)[0] for t in SCORE_TOKENS]
    return engine


def test_calls_ask_for_the_final_output_as_token_ids(fake_vllm: list[dict[str, Any]], tokenizer: Any) -> None:
    engine = _engine(tokenizer)
    engine._sampling_params(GenerationRequest(("Judge this.",), 64))
    engine._sampling_params(GenerationRequest(("Judge this.",), 64), stream=True)
    final, streamed = fake_vllm
    assert final["output_kind"] is OutputKind.FINAL_ONLY and final["detokenize"] is False
    assert streamed["output_kind"] is OutputKind.DELTA and streamed["detokenize"] is False
    assert final["temperature"] == 0.0 and final["max_tokens"] == 64
    assert final["logprob_token_ids"] == engine._watch_ids


def test_the_answer_is_decoded_once_with_its_digit_offsets(tokenizer: Any) -> None:
    """What vLLM's detokenizer gave before: the text without the end-of-turn token, the digit where it stands."""
    ids = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
    four = tokenizer.encode("4", add_special_tokens=False)[0]
    three = tokenizer.encode("3", add_special_tokens=False)[0]
    steps = [{four: Logprob(-5.0)} for _ in ids]
    steps[ids.index(four)] = {four: Logprob(math.log(0.75)), three: Logprob(math.log(0.25))}
    watch_ids = [tokenizer.encode(t, add_special_tokens=False)[0] for t in SCORE_TOKENS]
    result = answer(tokenizer, ids, steps, "stop", watch_ids, SCORE_TOKENS)
    assert result.text == ANSWER and result.finished
    (step,) = result.watched
    assert (step.offset, step.token) == (ANSWER.index("4"), "4")
    assert step.probs["4"] == pytest.approx(0.75) and step.probs["3"] == pytest.approx(0.25)
    assert step.probs["1"] == 0.0
    assert not answer(tokenizer, ids[:-1], steps, "length", watch_ids, SCORE_TOKENS).finished


def _group(side: int) -> list[tuple[Any, ...]]:
    """A GRPO edit group's calls: the source, a candidate, each judge's text."""
    source = Image.new("RGB", (side, side), "blue")
    candidates = [Image.new("RGB", (side, side), c) for c in ("red", "green", "orange")]
    return [(source, c, rubric) for c in candidates for rubric in ("execution", "consistency")]


def test_a_group_waits_for_the_first_prefill_of_each_shared_opening() -> None:
    def tokens(parts: Any) -> int:
        return sum(p.width * p.height // 784 for p in parts if isinstance(p, Image.Image))

    # 448 px: 256 tokens an image, two blocks of 128: each call waits on the first call that shares its
    # longest opening (its candidate's first judge, else the group's first call)
    assert prefill_leaders(_group(448), tokens, 128) == [None, 0, 0, 2, 0, 4]
    # 64 px: 5 tokens, no block filled, nothing to gain by waiting
    assert prefill_leaders(_group(64), tokens, 128) == [None] * 6
    # nothing shared, nothing awaited
    alone = [(Image.new("RGB", (448, 448)), "a"), (Image.new("RGB", (448, 448)), "a")]
    assert prefill_leaders(alone, tokens, 128) == [None, None]


class FakeLLM:
    """Plays AsyncLLM: each call answers `ANSWER`; a streamed call yields one step before its last."""

    def __init__(self, tokenizer: Any) -> None:
        self.ids = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
        self.log: list[tuple[str, str]] = []

    async def generate(self, inputs: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        name = inputs["prompt"]
        self.log.append(("submitted", name))
        await asyncio.sleep(0)  # the engine steps: other tasks run
        if params.output_kind is OutputKind.DELTA:
            self.log.append(("prefilled", name))
            yield self._output(self.ids[:1], None)
            await asyncio.sleep(0)
            yield self._output(self.ids[1:], "stop")
        else:
            yield self._output(self.ids, "stop")

    def _output(self, ids: list[int], finish: str | None) -> Any:
        completion = types.SimpleNamespace(token_ids=ids, logprobs=[{} for _ in ids], finish_reason=finish)
        return types.SimpleNamespace(outputs=[completion])


def test_calls_sharing_an_opening_are_submitted_after_its_prefill(fake_vllm: Any, tokenizer: Any) -> None:
    engine = _engine(tokenizer, group_prefill=True)
    llm = FakeLLM(tokenizer)
    engine._llm, engine._block_tokens, engine._pixels_per_token = llm, 128, 784
    names = iter(f"call {i}" for i in range(6))
    renders: dict[int, str] = {}

    def render(messages: Any, **_: Any) -> str:
        return renders.setdefault(id(messages), next(names))

    engine._processor = types.SimpleNamespace(apply_chat_template=render)
    results = asyncio.run(engine.generate([GenerationRequest(parts, 64) for parts in _group(448)]))
    assert all(r.text == ANSWER for r in results)  # streamed or not, the same answer
    order = [f"{event} {name}" for event, name in llm.log]
    # the first call streams, and only once it is prefilled do the others go
    assert order[:2] == ["submitted call 0", "prefilled call 0"]
    assert sum(e == "submitted" for e, _ in llm.log) == 6


def test_decoded_images_reach_vllm_keyed_by_the_bytes_they_came_from(fake_vllm: Any, tokenizer: Any) -> None:
    """vLLM skips hashing an image's pixels when given its key: the same bytes share one, other bytes differ,
    and an image made in-process is left for vLLM to hash."""
    from server.images import ImageLimits, decode_image
    from tests.support import b64

    engine = _engine(tokenizer)
    sent: list[dict[str, Any]] = []

    async def generate(inputs: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        sent.append(inputs)
        yield FakeLLM(tokenizer)._output(FakeLLM(tokenizer).ids, "stop")

    engine._llm = types.SimpleNamespace(generate=generate)
    engine._processor = types.SimpleNamespace(apply_chat_template=lambda *_, **__: "prompt")
    red, blue = b64("red"), b64("blue")
    limits = ImageLimits()
    again = decode_image(red, "edited", limits)
    calls = [
        (decode_image(red, "source", limits), decode_image(blue, "edited", limits), "Judge."),
        (again, again, "Judge."),
        (Image.new("RGB", (64, 64), "green"), "Judge."),
    ]
    results = asyncio.run(engine.generate([GenerationRequest(parts, 64) for parts in calls]))
    assert all(r.text == ANSWER for r in results)
    keys = [inputs["multi_modal_uuids"]["image"] for inputs in sent]
    (red_key, blue_key), (red_again, red_once_more), (made,) = keys
    assert red_key == red_again == red_once_more and red_key != blue_key
    assert isinstance(red_key, str) and made is None


def test_an_answer_whose_log_probs_miss_a_token_is_an_engine_error_not_a_score(fake_vllm: Any, tokenizer: Any) -> None:
    from server.engines.base import EngineError

    engine = _engine(tokenizer)
    ids = FakeLLM(tokenizer).ids

    async def generate(inputs: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        completion = types.SimpleNamespace(token_ids=ids, logprobs=[{} for _ in ids[1:]], finish_reason="stop")
        yield types.SimpleNamespace(outputs=[completion])

    engine._llm = types.SimpleNamespace(generate=generate)
    engine._processor = types.SimpleNamespace(apply_chat_template=lambda *_, **__: "prompt")
    (result,) = asyncio.run(engine.generate([GenerationRequest(("Judge this.",), 64)]))
    assert isinstance(result, EngineError) and "log-probs for" in str(result)


def test_step_limits_reach_vllm_only_when_set() -> None:
    from server.assembly import engine_options
    from server.settings import Settings

    unset = VLLMEngine("tiny", SCORE_TOKENS, **engine_options(Settings(), ["edit"]))
    assert "max_num_seqs" not in unset.engine_args and "max_num_batched_tokens" not in unset.engine_args
    settings = Settings(max_num_seqs=48, max_num_batched_tokens=6144)
    chosen = VLLMEngine("tiny", SCORE_TOKENS, **engine_options(settings, ["edit"]))
    assert (chosen.engine_args["max_num_seqs"], chosen.engine_args["max_num_batched_tokens"]) == (48, 6144)
