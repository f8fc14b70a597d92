"""Scoring end to end over real HTTP against a `firm-serve --tiny` process: dimensions, rewards,
group statistics, failures per item and shared batches. What every deployment of the API answers
alike (statuses, errors, headers, status routes) is in test_contract.py."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from clients.protocol import (
    EditGroupResponse,
    EditScoreResponse,
    GenGroupResponse,
    GenScoreResponse,
)
from server.rewards import ADVANTAGE_EPS, cme_reward, qma_reward
from tests.support import b64, metric_value

NOT_AN_IMAGE = "aGVsbG8gd29ybGQ="  # base64 of "hello world"


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120) as client:
        yield client


def _edit(item_id: str | None, source: str, edited: str) -> dict[str, str]:
    item = {"source": b64(source), "edited": b64(edited), "instruction": f"Make the square {edited}."}
    return item if item_id is None else {"id": item_id, **item}


def test_edit_score_returns_both_dimensions_and_the_cme_reward(client: httpx.Client) -> None:
    body = {"items": [_edit("done", "blue", "red"), _edit(None, "green", "green")], "return_reasoning": True}
    response = client.post("/v1/edit/score", json=body)
    assert response.status_code == 200, response.text
    parsed = EditScoreResponse.model_validate(response.json())
    assert parsed.model.name == "tiny-random"
    assert (parsed.score_mode, parsed.weights.w1, parsed.weights.w2) == ("argmax", 0.6, 0.4)
    assert [r.id for r in parsed.results] == ["done", "1"]  # given ids echoed, missing ones are the index
    for result in parsed.results:
        assert result.error is None
        assert result.execution is not None and result.consistency is not None
        assert result.execution.reasoning
        assert result.reward == pytest.approx(cme_reward(result.execution.score, result.consistency.score))
    unchanged = parsed.results[1]
    assert unchanged.execution is not None and unchanged.execution.score == 1
    assert unchanged.reward == 0.0  # an unchanged image earns nothing, however consistent


def test_reasoning_is_left_out_unless_asked_for(client: httpx.Client) -> None:
    response = client.post("/v1/edit/score", json={"items": [_edit("a", "blue", "red")]})
    result = response.json()["results"][0]
    assert result["execution"]["reasoning"] is None


def test_edit_group_statistics_match_the_item_rewards(client: httpx.Client) -> None:
    body = {
        "id": "prompt-7",
        "source": b64("blue"),
        "instruction": "Make the square red.",
        "candidates": [b64("red"), b64("blue"), b64("red", "JPEG"), NOT_AN_IMAGE],
    }
    response = client.post("/v1/edit/score_group", json=body)
    assert response.status_code == 200, response.text
    parsed = EditGroupResponse.model_validate(response.json())
    assert parsed.id == "prompt-7"
    assert [r.id for r in parsed.results] == ["0", "1", "2", "3"]
    failed = parsed.results[3]
    assert failed.reward is None and failed.error is not None
    assert (failed.error.code, failed.error.field) == ("invalid_image", "candidates[3]")
    rewards = [r.reward for r in parsed.results[:3]]
    assert all(r is not None for r in rewards)
    mean = sum(rewards) / 3  # type: ignore[arg-type]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)  # type: ignore[operator]
    assert parsed.group.scored == 3
    assert parsed.group.mean == pytest.approx(mean)
    assert parsed.group.std == pytest.approx(std)
    assert parsed.group.advantages[:3] == pytest.approx([(r - mean) / (std + ADVANTAGE_EPS) for r in rewards])
    assert parsed.group.advantages[3] is None


def test_gen_score_returns_instruction_following_quality_and_the_qma_reward(client: httpx.Client) -> None:
    items = [
        {"id": "x", "image": b64("red"), "prompt": "a red square"},
        {
            "id": "y",
            "image": "data:image/webp;base64," + b64("blue", "WEBP"),
            "prompt": "a red square",
            "requirement": "flat colours",
        },
    ]
    response = client.post("/v1/gen/score", json={"items": items})
    assert response.status_code == 200, response.text
    parsed = GenScoreResponse.model_validate(response.json())
    assert [r.id for r in parsed.results] == ["x", "y"]
    for result in parsed.results:
        following, quality = result.instruction_following, result.quality
        assert result.error is None and following is not None and quality is not None
        assert quality.subscores is not None
        assert quality.score == min(quality.subscores.model_dump().values())
        assert result.reward == pytest.approx(qma_reward(following.score, quality.score))


def test_gen_group_with_a_broken_image_scores_the_rest(client: httpx.Client) -> None:
    body = {"prompt": "a orange square", "images": [b64("orange"), NOT_AN_IMAGE, b64("green")]}
    response = client.post("/v1/gen/score_group", json=body)
    assert response.status_code == 200, response.text
    parsed = GenGroupResponse.model_validate(response.json())
    assert [r.error is None for r in parsed.results] == [True, False, True]
    assert parsed.group.scored == 2
    assert parsed.group.advantages[1] is None
    assert parsed.group.mean == pytest.approx((parsed.results[0].reward + parsed.results[2].reward) / 2)  # type: ignore[operator]


def test_an_undecodable_image_fails_only_its_item(client: httpx.Client) -> None:
    bad = {"id": "bad", "source": b64("blue"), "edited": NOT_AN_IMAGE, "instruction": "Make the square red."}
    response = client.post("/v1/edit/score", json={"items": [_edit("ok", "blue", "red"), bad]})
    assert response.status_code == 200
    ok, failed = EditScoreResponse.model_validate(response.json()).results
    assert ok.error is None and ok.reward is not None
    assert failed.reward is None and failed.execution is None
    assert failed.error is not None and failed.error.code == "invalid_image"
    assert failed.error.field == "items[1].edited"


def _batch_histogram(client: httpx.Client) -> tuple[float, float]:
    page = client.get("/metrics").text
    total = metric_value(page, "firm_engine_batch_size_count")
    up_to_two = metric_value(page, "firm_engine_batch_size_bucket", le="2.0")
    return total, up_to_two


def test_concurrent_requests_share_engine_batches(client: httpx.Client) -> None:
    before_total, before_small = _batch_histogram(client)

    def one(i: int) -> int:
        item = _edit(str(i), "blue", "red") | {"instruction": f"Make the square red. (request {i})"}  # all distinct
        return client.post("/v1/edit/score", json={"items": [item]}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(16))) == [200] * 16
    total, small = _batch_histogram(client)
    # each request brings 2 judge calls; batches of more than 2 hold calls of several requests
    assert total - before_total > 0
    assert (total - before_total) - (small - before_small) > 0, "no batch held more than one request's calls"
