"""The HTTP contract: what every deployment of the API answers alike, whatever serves it.

`Contract` holds the checks; a test class that subclasses it supplies a `target` fixture and runs
them all against its deployment: `TestFirmServe` below against real `firm-serve --tiny` processes,
`TestRayContract` in test_ray.py against the Ray Serve application on a local cluster. A target
is two deployments: `url` serves every critic without keys and takes at most MAX_ITEMS items per
request; `limited_url` serves the editing critic only (generation is switched off), wants the API
key KEY and takes bodies of at most BODY_LIMIT bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clients.images import encode
from clients.protocol import (
    MAX_INSTRUCTION_CHARS,
    MAX_ITEMS_PER_REQUEST,
    ErrorResponse,
    ModelsResponse,
    ScoringResponse,
)
from clients.tasks import TASKS
from server.judges import load_judges
from tests.support import b64, metric_value, running_server

KEY = "contract-key-0123456789"
ADMIN_KEY = "contract-admin-0123456789"
BODY_LIMIT = 100_000
MAX_ITEMS = 32
NOT_AN_IMAGE = "aGVsbG8gd29ybGQ="  # base64 of "hello world"
WAIT_S = 60.0  # the longest a deployment's metrics page may lag behind its answers

# The limited deployment's settings, by `firm-serve` setting name.
LIMITED = {"gen_model": "none", "max_body_bytes": BODY_LIMIT, "api_keys": f"contract:{KEY}"}

# One body for each scoring route, and which of its items are scored (the others fail alone).
BODIES: dict[str, dict[str, Any]] = {
    "/v1/edit/score": {
        "items": [
            {"id": "done", "source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."},
            {"id": "unchanged", "source": b64("blue"), "edited": b64("blue"), "instruction": "Make the square red."},
            {"id": "broken", "source": b64("blue"), "edited": NOT_AN_IMAGE, "instruction": "Paint it red."},
        ],
        "return_reasoning": True,
    },
    "/v1/edit/score_group": {
        "source": b64("green"),
        "instruction": "Make the square orange.",
        "candidates": [b64("orange"), b64("green"), b64("yellow")],
        "score_mode": "expected",
    },
    "/v1/gen/score": {
        "items": [
            {"id": "a", "image": b64("red"), "prompt": "a red square"},
            {"id": "b", "image": b64("purple"), "prompt": "a yellow square", "requirement": "flat colours"},
        ],
        "return_reasoning": True,
    },
    "/v1/gen/score_group": {"prompt": "a blue square", "images": [b64("blue"), b64("orange")]},
}
SCORED = {"/v1/edit/score": [True, True, False]}  # routes not named here score every item
RESPONSES: dict[str, type[ScoringResponse]] = {
    path: answer
    for spec in TASKS.values()
    for path, answer in ((spec.score_path, spec.score_response), (spec.group_path, spec.group_response))
}

MALFORMED = [
    ({}, "items"),
    ({"items": []}, "items"),
    ({"items": [{"source": "x", "edited": "y"}]}, "items[0].instruction"),
    ({"items": [{"source": "x", "edited": "y", "instruction": "z", "colour": "red"}]}, "items[0].colour"),
    ({"items": [{"source": "x", "edited": "y", "instruction": "z" * (MAX_INSTRUCTION_CHARS + 1)}]}, "instruction"),
    ({"items": [{"source": "x", "edited": "y", "instruction": "z"}], "weights": {"w1": 0.0, "w2": 0.0}}, "w1 + w2"),
    ({"items": [{"source": "x", "edited": "y", "instruction": "z"}], "score_mode": "mean"}, "score_mode"),
    ({"items": [{"source": "x", "edited": "y", "instruction": "z"}] * (MAX_ITEMS_PER_REQUEST + 1)}, "items"),
]


@dataclass(frozen=True)
class Target:
    """A deployment of the API under test (see the module's docstring)."""

    url: str
    limited_url: str
    not_ready: Callable[[], AbstractContextManager[None]] | None = None  # the limited critic not ready meanwhile
    why_never_not_ready: str = ""  # where `not_ready` is None: why the target cannot make its critic not ready


def _error(response: httpx.Response) -> ErrorResponse:
    assert "Traceback" not in response.text
    assert response.headers["content-type"] == "application/json"
    return ErrorResponse.model_validate(response.json())


def _keyed(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Contract:
    """Every check of the contract; subclasses supply the `target` fixture."""

    @pytest.mark.parametrize("route", list(RESPONSES))  # every task's routes: a new task needs a body here
    def test_each_scoring_route_answers_its_response_model(self, target: Target, route: str) -> None:
        response = httpx.post(f"{target.url}{route}", json=BODIES[route], timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        answer = RESPONSES[route].model_validate(response.json())
        scored = SCORED.get(route, [True] * len(answer.results))
        assert [result.reward is not None for result in answer.results] == scored
        assert [result.error is None for result in answer.results] == scored
        if (group := getattr(answer, "group", None)) is not None:
            assert group.scored == sum(scored) and len(group.advantages) == len(scored)

    def test_the_request_id_is_echoed_or_made_up(self, target: Target) -> None:
        given = httpx.get(f"{target.url}/v1/models", headers={"X-Request-ID": "contract-7f3a"})
        assert set(given.headers.get_list("x-request-id")) == {"contract-7f3a"}
        made_up = httpx.post(f"{target.url}/v1/gen/score", json={})  # refusals carry one too
        assert made_up.status_code == 422 and made_up.headers["x-request-id"]

    @pytest.mark.parametrize(("body", "mentions"), MALFORMED)
    def test_malformed_requests_get_422_naming_the_field(self, target: Target, body: dict, mentions: str) -> None:
        response = httpx.post(f"{target.url}/v1/edit/score", json=body)
        assert response.status_code == 422
        error = _error(response).error
        assert error.code == "invalid_request"
        assert mentions in error.message

    def test_a_body_that_is_not_json_gets_400_saying_so(self, target: Target) -> None:
        headers = {"content-type": "application/json"}
        response = httpx.post(f"{target.url}/v1/gen/score", content=b"\x80not json", headers=headers)
        assert response.status_code == 400
        error = _error(response).error
        assert error.code == "invalid_json" and "not valid JSON" in error.message

    def test_a_body_not_sent_as_json_gets_422_naming_the_content_type(self, target: Target) -> None:
        body = b'{"items": [{"image": "eA==", "prompt": "p"}]}'  # JSON, sent as curl -d sends it: a form
        for sent in ("application/x-www-form-urlencoded", "text/json", None):
            headers = {"content-type": sent} if sent else {}
            response = httpx.post(f"{target.url}/v1/gen/score", content=body, headers=headers)
            assert response.status_code == 422
            error = _error(response).error
            assert error.code == "invalid_request" and "send it as application/json" in error.message, error.message
            assert f"content-type: {sent or 'none'}" in error.message
        # read as JSON, though not a request: the field is named, not the content type
        listed = httpx.post(f"{target.url}/v1/gen/score", content=b"[1]", headers={"content-type": "Application/JSON"})
        assert listed.status_code == 422 and "application/json" not in _error(listed).error.message
        empty = httpx.post(f"{target.url}/v1/gen/score")
        assert empty.status_code == 422 and "application/json" not in _error(empty).error.message

    def test_more_items_than_the_server_allows_get_413_with_the_limit(self, target: Target) -> None:
        items = [{"image": "eA==", "prompt": "p"}] * (MAX_ITEMS + 1)
        response = httpx.post(f"{target.url}/v1/gen/score", json={"items": items})
        assert response.status_code == 413
        error = _error(response).error
        assert (error.code, error.limit) == ("too_large", MAX_ITEMS)

    def test_an_image_over_the_pixel_limit_gets_413_naming_it(self, target: Target) -> None:
        bomb = encode(Image.new("1", (8000, 6000)))  # 48 M pixels, a few kB of PNG
        body = {"items": [{"id": "a", "image": b64("red"), "prompt": "p"}, {"image": bomb, "prompt": "p"}]}
        response = httpx.post(f"{target.url}/v1/gen/score", json=body, timeout=120)
        assert response.status_code == 413
        error = _error(response).error
        assert error.code == "image_too_large"
        assert "items[1].image" in error.message and error.limit == 40_000_000

    def test_a_missing_or_unknown_key_gets_401(self, target: Target) -> None:
        body = BODIES["/v1/edit/score"]
        for headers in ({}, _keyed("not-a-key")):
            response = httpx.post(f"{target.limited_url}/v1/edit/score", json=body, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert _error(response).error.code == "unauthorized"
        assert httpx.get(f"{target.limited_url}/readyz").status_code == 200, "readiness needs no key"

    def test_a_switched_off_model_answers_404_and_readiness_says_so(self, target: Target) -> None:
        body = {"items": [{"image": "eA==", "prompt": "p"}]}
        response = httpx.post(f"{target.limited_url}/v1/gen/score", json=body, headers=_keyed())
        assert response.status_code == 404
        error = _error(response).error
        assert error.code == "model_disabled" and "gen model is switched off" in error.message
        assert httpx.get(f"{target.limited_url}/readyz").json()["models"] == {"edit": "ready", "gen": "disabled"}
        edit = {"items": BODIES["/v1/edit/score"]["items"][:1]}
        assert httpx.post(f"{target.limited_url}/v1/edit/score", json=edit, headers=_keyed(), timeout=120).is_success

    def test_a_body_over_the_limit_gets_413_before_it_is_read(self, target: Target) -> None:
        big = {"items": [{"source": "A" * 2 * BODY_LIMIT, "edited": "x", "instruction": "y"}]}
        response = httpx.post(f"{target.limited_url}/v1/edit/score", json=big, headers=_keyed())
        assert response.status_code == 413
        error = _error(response).error
        assert (error.code, error.limit) == ("body_too_large", BODY_LIMIT)

    def test_a_streamed_body_over_the_limit_gets_413(self, target: Target) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"items": [{"source": "'
            for _ in range(3 * BODY_LIMIT // 10_000):
                yield b"A" * 10_000
            yield b'", "edited": "x", "instruction": "y"}]}'

        headers = {"content-type": "application/json", **_keyed()}
        response = httpx.post(f"{target.limited_url}/v1/edit/score", content=chunks(), headers=headers)
        assert response.status_code == 413
        assert _error(response).error.code == "body_too_large"

    def test_a_model_that_is_not_ready_answers_503_with_retry_after(self, target: Target) -> None:
        if target.not_ready is None:
            pytest.skip(target.why_never_not_ready)
        edit = {"items": BODIES["/v1/edit/score"]["items"][:1]}
        with target.not_ready():
            refused = httpx.post(f"{target.limited_url}/v1/edit/score", json=edit, headers=_keyed(), timeout=60)
            assert refused.status_code == 503
            assert _error(refused).error.code == "not_ready"
            assert int(refused.headers["retry-after"]) > 0
            readiness = httpx.get(f"{target.limited_url}/readyz")
            assert readiness.status_code == 503 and readiness.json()["ready"] is False

    def test_status_routes(self, target: Target) -> None:
        assert httpx.get(f"{target.url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{target.url}/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True, "models": {"edit": "ready", "gen": "ready"}})
        models = ModelsResponse.model_validate(httpx.get(f"{target.url}/v1/models").json()).models
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

    def test_openapi_document_describes_routes_and_limits(self, target: Target) -> None:
        spec = httpx.get(f"{target.url}/openapi.json").json()
        for path in RESPONSES:
            assert "post" in spec["paths"][path]
            assert {"200", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])
        schemas = spec["components"]["schemas"]
        assert schemas["EditScoreRequest"]["properties"]["items"]["maxItems"] == MAX_ITEMS_PER_REQUEST
        assert schemas["EditItem"]["properties"]["instruction"]["maxLength"] == MAX_INSTRUCTION_CHARS
        assert "EditResult" in schemas and "GroupStats" in schemas

    def test_metrics_expose_the_service_series(self, target: Target) -> None:
        httpx.post(f"{target.url}/v1/gen/score", json={"items": [{"image": NOT_AN_IMAGE, "prompt": "p"}]})
        assert httpx.post(f"{target.url}/v1/edit/score", json=BODIES["/v1/edit/score"], timeout=120).is_success
        expected = (
            ("firm_requests_total", {"route": "/v1/edit/score", "status": "200"}),
            ("firm_items_total", {"task": "gen", "outcome": "invalid_image"}),
            ("firm_judge_score_count", {"dimension": "edit_execution"}),
        )
        deadline = time.monotonic() + WAIT_S
        while True:  # a page gathered from replicas lags their answers by up to one push interval
            page = httpx.get(f"{target.url}/metrics")
            missing = [(name, labels) for name, labels in expected if metric_value(page.text, name, **labels) < 1]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        assert not missing, missing
        for series in (
            "firm_request_seconds_bucket",
            "firm_engine_batch_size_bucket",
            "firm_engine_batch_seconds_bucket",
            "firm_queue_depth",
            "firm_judge_score_bucket",
            "firm_parse_failures_total",
        ):
            assert series in page.text, series


# ---------------------------------------------------------------------------- firm-serve


@pytest.fixture(scope="module")
def limited_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    flags = [arg for name, value in LIMITED.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    with running_server(cache_dir, *flags, "--admin-key", ADMIN_KEY) as url:
        yield url


class TestFirmServe(Contract):
    @pytest.fixture(scope="class")
    def target(self, server_url: str, limited_url: str) -> Target:
        @contextmanager
        def asleep() -> Iterator[None]:
            """The limited critic asleep (the admin route) until the block ends."""
            assert httpx.post(f"{limited_url}/v1/admin/sleep", headers=_keyed(ADMIN_KEY), timeout=60).is_success
            try:
                yield
            finally:
                assert httpx.post(f"{limited_url}/v1/admin/wake", headers=_keyed(ADMIN_KEY), timeout=60).is_success

        return Target(url=server_url, limited_url=limited_url, not_ready=asleep)
