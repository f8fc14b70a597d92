"""The scoring service in-process on the tiny critic: failure paths, score modes, weights."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest

from clients.protocol import EditItem, EditScoreRequest, GenGroupRequest, RewardWeights
from server.assembly import build_service
from server.metrics import Metrics
from server.rewards import cme_reward, qma_reward
from server.scoring import ScoringService
from server.settings import Settings
from tests.support import b64, metric_value

T = TypeVar("T")


def _serve(cache_dir: Path, work: Callable[[ScoringService], Awaitable[T]], **settings: Any) -> tuple[T, str]:
    """Start a service on the tiny critic, run `work`, close it; returns the result and the metrics page."""
    metrics = Metrics()
    service = build_service(Settings(tiny=True, cache_dir=cache_dir, **settings), metrics)

    async def run() -> T:
        await service.start()
        try:
            return await work(service)
        finally:
            await service.close()

    result = asyncio.run(run())
    return result, generate_latest(metrics.registry).decode()


def _edit_request(**options: Any) -> EditScoreRequest:
    items = [
        EditItem(id="done", source=b64("blue"), edited=b64("red"), instruction="Make the square red."),
        EditItem(id="same", source=b64("green"), edited=b64("green"), instruction="Make the square orange."),
    ]
    return EditScoreRequest(items=items, **options)


def test_an_unparsable_answer_is_a_null_reward_with_an_error_never_a_zero(
    tiny_checkpoint: Path, cache_dir: Path
) -> None:
    # 8 new tokens cut every answer before its score: real model output that cannot be parsed
    response, page = _serve(cache_dir, lambda s: s.score(_edit_request()), edit_max_new_tokens=8)
    for result in response.results:
        assert result.reward is None
        assert result.error is not None and result.error.code == "parse_error"
        assert "cut off at its budget of 8 new tokens" in result.error.message
    assert metric_value(page, "firm_parse_failures_total") >= 2
    assert metric_value(page, "firm_items_total", task="edit", outcome="parse_error") == 2
    assert metric_value(page, "firm_items_total", task="edit", outcome="ok") == 0


def test_expected_mode_feeds_the_probability_weighted_scores_to_the_reward(
    tiny_checkpoint: Path, cache_dir: Path
) -> None:
    response, _ = _serve(cache_dir, lambda s: s.score(_edit_request(score_mode="expected")))
    assert response.score_mode == "expected"
    for result in response.results:
        e, c = result.execution, result.consistency
        assert e is not None and c is not None and e.expected is not None and c.expected is not None
        assert e.normalized == pytest.approx((e.expected - 1) / 4)
        assert result.reward == pytest.approx(cme_reward(e.expected, c.expected))
        assert result.reward not in (0.0, 1.0)  # smooth, not a tie


def test_request_weights_override_the_servers(tiny_checkpoint: Path, cache_dir: Path) -> None:
    weights = RewardWeights(w1=0.5, w2=0.5)
    request = GenGroupRequest(prompt="a red square", images=[b64("red"), b64("blue")], weights=weights)
    response, _ = _serve(cache_dir, lambda s: s.score(request), qma_w1=0.3, qma_w2=0.7)
    assert response.weights == weights
    for result in response.results:
        assert result.instruction_following is not None and result.quality is not None
        expected = qma_reward(result.instruction_following.score, result.quality.score, weights)
        assert result.reward == pytest.approx(expected)


def test_server_weights_apply_when_the_request_has_none(tiny_checkpoint: Path, cache_dir: Path) -> None:
    response, _ = _serve(cache_dir, lambda s: s.score(_edit_request()), cme_w1=0.2, cme_w2=0.8)
    assert (response.weights.w1, response.weights.w2) == (0.2, 0.8)
    done = response.results[0]
    assert done.execution is not None and done.consistency is not None
    assert done.reward == pytest.approx(cme_reward(done.execution.score, done.consistency.score, response.weights))


def test_an_engine_that_refuses_to_sleep_keeps_its_models_scoring(tiny_checkpoint: Path, cache_dir: Path) -> None:
    """A failed offload leaves the weights loaded: the models stay ready instead of answering 503 until a wake."""

    async def work(service: ScoringService) -> dict[str, str]:
        engine = next(iter(service.models.values())).engine

        async def refuse() -> None:
            raise RuntimeError("sleep mode is off")

        engine.sleep = refuse  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await service.sleep()
        return service.states()

    states, _ = _serve(cache_dir, work)
    assert set(states.values()) == {"ready"}


def test_the_model_cards_say_how_images_are_taken(tiny_checkpoint: Path, cache_dir: Path) -> None:
    async def cards(service: ScoringService) -> list[Any]:
        return service.cards()

    found, _ = _serve(cache_dir, cards, image_pixel_budget=512 * 512, max_image_bytes=4096)
    for card in found:
        assert card.images is not None
        assert card.images.formats == ["JPEG", "PNG", "WEBP"] and card.images.reencoded is False
        assert (card.images.pixel_budget, card.images.max_image_bytes) == (512 * 512, 4096)


def test_while_the_first_canary_run_takes_its_reference_every_view_says_loading_and_scoring_waits(
    tiny_checkpoint: Path, cache_dir: Path
) -> None:
    from server.errors import NotReady

    service = build_service(Settings(tiny=True, cache_dir=cache_dir, gen_model="none"), Metrics())
    canaries, release, taking = service.canaries, asyncio.Event(), asyncio.Event()
    assert canaries is not None, "the tiny service has canaries by default"

    class Held:
        """The real canary set, its first run held until the test has looked."""

        async def run(self, reason: str) -> None:
            taking.set()
            await release.wait()
            await canaries.run(reason)

    service.add_canaries(Held(), every=0)  # type: ignore[arg-type]

    async def scenario() -> tuple[list[str], list[str]]:
        starting = asyncio.create_task(service.start())
        try:
            await asyncio.wait_for(taking.wait(), timeout=120)
            during = [service.states()["edit"], *(card.state for card in service.cards())]
            with pytest.raises(NotReady, match="taking their reference") as refused:
                await service.score(_edit_request())
            assert refused.value.retry_after > 0
            release.set()
            await asyncio.wait_for(starting, timeout=120)
            after = [service.states()["edit"], *(card.state for card in service.cards())]
            response = await service.score(_edit_request())
            assert all(result.reward is not None for result in response.results)
            return during, after
        finally:
            release.set()
            await service.close()

    during, after = asyncio.run(scenario())
    assert during == ["loading", "loading"]  # /readyz and /v1/models agree
    assert after == ["ready", "ready"]
    assert canaries.runs == 1  # the held run was the real one, and it took the reference
