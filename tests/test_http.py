"""End to end over real HTTP against a `firm-serve --tiny` process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clients.images import encode
from clients.protocol import (
    MAX_INSTRUCTION_CHARS,
    MAX_ITEMS_PER_REQUEST,
    EditGroupResponse,
    EditScoreResponse,
    ErrorResponse,
    GenGroupResponse,
    GenScoreResponse,
    ModelsResponse,
)
from server.judges import load_judges
from server.rewards import ADVANTAGE_EPS, cme_reward, qma_reward
from tests.support import b64, metric_value, running_server

NOT_AN_IMAGE = "aGVsbG8gd29ybGQ="  # base64 of "hello world"


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120) as client:
        yield client


def _edit(item_id: str | None, source: str, edited: str) -> dict[str, str]:
    item = {"source": b64(source), "edited": b64(edited), "instruction": f"Make the square {edited}."}
    return item if item_id is None else {"id": item_id, **item}


def _error(response: httpx.Response) -> ErrorResponse:
    assert "Traceback" not in response.text
    return ErrorResponse.model_validate(response.json())


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


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [{"source": "x", "edited": "y"}]}, "items[0].instruction"),
        ({"items": [{"source": "x", "edited": "y", "instruction": "z", "colour": "red"}]}, "items[0].colour"),
        ({"items": [{"source": "x", "edited": "y", "instruction": "z" * (MAX_INSTRUCTION_CHARS + 1)}]}, "instruction"),
        ({"items": [{"source": "x", "edited": "y", "instruction": "z"}], "weights": {"w1": 0.0, "w2": 0.0}}, "w1 + w2"),
        ({"items": [{"source": "x", "edited": "y", "instruction": "z"}], "score_mode": "mean"}, "score_mode"),
        ({"items": [{"source": "x", "edited": "y", "instruction": "z"}] * (MAX_ITEMS_PER_REQUEST + 1)}, "items"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(client: httpx.Client, body: dict, mentions: str) -> None:
    response = client.post("/v1/edit/score", json=body)
    assert response.status_code == 422
    error = _error(response).error
    assert error.code == "invalid_request"
    assert mentions in error.message


def test_body_that_is_not_json_gets_422(client: httpx.Client) -> None:
    response = client.post("/v1/gen/score", content=b"\x80not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert _error(response).error.code == "invalid_request"


def test_more_items_than_the_server_allows_get_413_with_the_limit(client: httpx.Client) -> None:
    items = [{"image": "eA==", "prompt": "p"}] * 33  # the test server allows 32
    response = client.post("/v1/gen/score", json={"items": items})
    assert response.status_code == 413
    error = _error(response).error
    assert (error.code, error.limit) == ("too_large", 32)


def test_an_image_over_the_pixel_limit_gets_413_naming_it(client: httpx.Client) -> None:
    bomb = encode(Image.new("1", (8000, 6000)))  # 48 M pixels, a few kB of PNG
    body = {"items": [{"id": "a", "image": b64("red"), "prompt": "p"}, {"image": bomb, "prompt": "p"}]}
    response = client.post("/v1/gen/score", json=body)
    assert response.status_code == 413
    error = _error(response).error
    assert error.code == "image_too_large"
    assert "items[1].image" in error.message and error.limit == 40_000_000


def test_status_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "models": {"edit": "ready", "gen": "ready"}}
    models = ModelsResponse.model_validate(client.get("/v1/models").json()).models
    assert {(m.task, m.reward, m.engine) for m in models} == {
        ("edit", "CME", "transformers"),
        ("gen", "QMA", "transformers"),
    }
    edit = next(m for m in models if m.task == "edit")
    assert edit.dimensions == ["edit_execution", "edit_consistency"]
    # the tiny critic is no released checkpoint: it gets this project's templates, with the release's budgets
    judges = {j.name: j for m in models for j in m.judges}
    assert {name: j.max_new_tokens for name, j in judges.items()} == {
        "edit_execution": 256,
        "edit_consistency": 256,
        "gen_instruction_following": 8192,
        "gen_quality": 8192,
    }
    own = load_judges()
    assert judges["gen_quality"].prompt_source == "packaged gen_quality.txt"
    assert judges["edit_execution"].prompt_sha256 == own["edit_execution"].sha256
    assert judges["edit_execution"].prompt_verified is None


def test_openapi_document_describes_routes_and_limits(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/edit/score", "/v1/edit/score_group", "/v1/gen/score", "/v1/gen/score_group"):
        assert "post" in spec["paths"][path]
        assert {"200", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["EditScoreRequest"]["properties"]["items"]["maxItems"] == MAX_ITEMS_PER_REQUEST
    assert schemas["EditItem"]["properties"]["instruction"]["maxLength"] == MAX_INSTRUCTION_CHARS
    assert "EditResult" in schemas and "GroupStats" in schemas


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


def test_metrics_expose_the_service_series(client: httpx.Client) -> None:
    client.post("/v1/gen/score", json={"items": [{"image": NOT_AN_IMAGE, "prompt": "p"}]})
    page = client.get("/metrics").text
    for series in (
        "firm_requests_total",
        "firm_request_seconds_bucket",
        "firm_items_total",
        "firm_engine_batch_size_bucket",
        "firm_engine_batch_seconds_bucket",
        "firm_queue_depth",
        "firm_judge_score_bucket",
        "firm_parse_failures_total",
    ):
        assert series in page, series
    assert metric_value(page, "firm_requests_total", route="/v1/edit/score", status="200") >= 1
    assert metric_value(page, "firm_items_total", task="gen", outcome="invalid_image") >= 1
    assert metric_value(page, "firm_judge_score_count", dimension="edit_execution") >= 1


@pytest.fixture(scope="module")
def edit_only_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    with running_server(cache_dir, "--gen-model", "none", "--max-body-bytes", "100000") as url:
        yield url


def test_a_switched_off_model_answers_404_and_readiness_says_so(edit_only_url: str) -> None:
    response = httpx.post(f"{edit_only_url}/v1/gen/score", json={"items": [{"image": "eA==", "prompt": "p"}]})
    assert response.status_code == 404
    error = _error(response).error
    assert error.code == "model_disabled" and "gen model is switched off" in error.message
    assert httpx.get(f"{edit_only_url}/readyz").json()["models"] == {"edit": "ready", "gen": "disabled"}
    assert httpx.post(f"{edit_only_url}/v1/edit/score", json={"items": [_edit("a", "blue", "red")]}).status_code == 200


def test_a_body_over_the_limit_gets_413_before_it_is_read(edit_only_url: str) -> None:
    big = {"items": [{"source": "A" * 200_000, "edited": "x", "instruction": "y"}]}
    response = httpx.post(f"{edit_only_url}/v1/edit/score", json=big)
    assert response.status_code == 413
    error = _error(response).error
    assert (error.code, error.limit) == ("body_too_large", 100000)


def test_a_streamed_body_over_the_limit_gets_413(edit_only_url: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"items": [{"source": "'
        for _ in range(30):
            yield b"A" * 10_000
        yield b'", "edited": "x", "instruction": "y"}]}'

    response = httpx.post(
        f"{edit_only_url}/v1/edit/score", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert _error(response).error.code == "body_too_large"
