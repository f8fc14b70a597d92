"""The transformers engine on the tiny critic, loaded exactly as a real checkpoint is."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.engines.base import EngineError, GenerationRequest, GenerationResult
from server.engines.transformers import TransformersEngine
from server.judges import SCORE_TOKENS, load_judges
from tests.support import picture

JUDGES = load_judges()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(str(tiny_checkpoint), SCORE_TOKENS, device="cpu")
    asyncio.run(engine.start())
    yield engine


def _requests(max_new_tokens: int = 128) -> dict[str, GenerationRequest]:
    done = (picture("blue"), picture("red"))
    return {
        "edit_execution": GenerationRequest(
            JUDGES["edit_execution"].prompt(done, instruction="Make the square red."), max_new_tokens
        ),
        "edit_consistency": GenerationRequest(
            JUDGES["edit_consistency"].prompt(done, instruction="Make the square red."), max_new_tokens
        ),
        "gen_instruction_following": GenerationRequest(
            JUDGES["gen_instruction_following"].prompt((picture("red"),), prompt="a red square", requirement="none"),
            max_new_tokens,
        ),
        "gen_quality": GenerationRequest(JUDGES["gen_quality"].prompt((picture("green"),)), max_new_tokens),
    }


def _generate(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return asyncio.run(engine.generate(requests))


def test_tiny_critic_writes_answers_every_judge_can_parse(engine: TransformersEngine) -> None:
    requests = _requests()
    results = _generate(engine, list(requests.values()))
    for name, result in zip(requests, results, strict=True):
        assert result.finished, result.text
        outcome = JUDGES[name].judge(result)
        assert all(1 <= s <= 5 for s in outcome.scores.values())
        assert all(e is not None for e in outcome.expected.values()), f"{name}: no probabilities at the score"


def test_watched_steps_point_at_the_written_digit_and_hold_its_probability(engine: TransformersEngine) -> None:
    for result in _generate(engine, list(_requests().values())):
        assert result.watched, result.text
        for step in result.watched:
            assert result.text[step.offset] == step.token
            assert set(step.probs) == set(SCORE_TOKENS)
            assert 0.0 <= sum(step.probs.values()) <= 1.0 + 1e-6
            # greedy decoding wrote the most likely token, so it is the likeliest watched token too
            assert max(step.probs, key=step.probs.__getitem__) == step.token


def test_same_input_same_answer_alone_or_in_a_mixed_batch(engine: TransformersEngine) -> None:
    requests = list(_requests().values())
    batched = _generate(engine, requests)
    alone = [_generate(engine, [r])[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in alone]
    for b, a in zip(batched, alone, strict=True):
        for sb, sa in zip(b.watched, a.watched, strict=True):
            assert sb.probs == pytest.approx(sa.probs, abs=1e-3)


@pytest.fixture(scope="module")
def invariant_engine(tiny_checkpoint: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(str(tiny_checkpoint), SCORE_TOKENS, device="cpu", batch_invariant=True)
    asyncio.run(engine.start())
    yield engine


def test_batch_invariant_answers_are_bit_identical_in_any_company_and_order(
    invariant_engine: TransformersEngine,
) -> None:
    """Without it, a decoding step's matrix products change kernel with the number of rows: the low bits move."""
    others = list(_requests().values())
    target = others.pop(0)
    judge = JUDGES["edit_execution"]
    others += [  # longer prompts: the shorter rows of a batch are padded
        GenerationRequest(judge.prompt((picture(a), picture(b)), instruction=f"Make the square {b}, as asked."), 128)
        for a, b in (("red", "blue"), ("green", "green"), ("blue", "orange"))
    ]
    alone = _generate(invariant_engine, [target])[0]
    assert alone.watched, alone.text
    for company in (others[:1], others[:4], others[::-1]):
        for position in (0, len(company) // 2, len(company)):
            batch = [*company[:position], target, *company[position:]]
            assert _generate(invariant_engine, batch)[position] == alone  # text, finished, every probability


def test_batch_invariant_engine_takes_calls_one_at_a_time_and_skips_abandoned_ones(
    invariant_engine: TransformersEngine,
) -> None:
    assert invariant_engine.batch_invariant and invariant_engine.batch_limit() == 1
    first, abandoned = list(_requests().values())[:2]
    abandoned.cancelled.set()
    done, skipped = _generate(invariant_engine, [first, abandoned])
    assert isinstance(done, GenerationResult) and done.finished
    assert isinstance(skipped, EngineError) and "abandoned" in str(skipped)


def test_max_new_tokens_cuts_the_answer_and_says_so(engine: TransformersEngine) -> None:
    request = _requests(max_new_tokens=3)["edit_execution"]
    (result,) = _generate(engine, [request])
    assert not result.finished
    assert len(result.text) < 20


def test_tiny_critic_learned_its_toy_rule(engine: TransformersEngine) -> None:
    """The builder teaches: an edit that shows a new colour executes (5); an unchanged image does not (1)."""
    judge = JUDGES["edit_execution"]
    done = GenerationRequest(judge.prompt((picture("blue"), picture("red")), instruction="Make the square red."), 128)
    same = GenerationRequest(judge.prompt((picture("blue"), picture("blue")), instruction="Make the square red."), 128)
    done_result, same_result = _generate(engine, [done, same])
    assert judge.judge(done_result).scores["score"] == 5
    assert judge.judge(same_result).scores["score"] == 1


def test_watched_tokens_must_be_single_tokens(tiny_checkpoint: Path) -> None:
    engine = TransformersEngine(str(tiny_checkpoint), ("10",), device="cpu")
    with pytest.raises(EngineError, match="not a single token"):
        asyncio.run(engine.start())
