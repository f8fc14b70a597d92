"""A caller's own deadline (`timeout_s`): past it, the request answers with its unfinished items failed
as `deadline`, and a neighbour without one is untouched. Against a real firm-serve whose plug-in engine
takes seconds per batch."""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import b64, metric_value, picture, running_server

ENGINE_SECONDS = 5.0  # each engine batch of the simulated engine


@pytest.fixture(scope="module")
def slow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("FIRM_SIM_A", str(ENGINE_SECONDS))
    monkeypatch.setenv("FIRM_SIM_B", "0.0")
    args = ("--engine", "bench.sim_engine:SimulatedEngine", "--edit-model", "sim", "--gen-model", "none")
    try:
        with running_server(tmp_path_factory.mktemp("deadline"), *args, tiny=False) as url:
            yield url
    finally:
        monkeypatch.undo()


def _group(**options: object) -> dict[str, object]:
    body = {"source": b64("blue"), "instruction": "Make it red.", "candidates": [b64("red"), b64("green")]}
    return body | options


def test_a_caller_deadline_fails_the_unfinished_items_and_spares_a_neighbour(slow_url: str) -> None:
    def post(body: dict[str, object]) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = httpx.post(f"{slow_url}/v1/edit/score_group", json=body, timeout=60)
        return response, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        neighbour = pool.submit(post, _group())
        hurried = pool.submit(post, _group(timeout_s=1.0))
        (short, short_s), (full, _) = hurried.result(), neighbour.result()
    assert short.status_code == 200, short.text
    results = short.json()["results"]
    assert [r["error"]["code"] for r in results] == ["deadline", "deadline"]
    assert all(r["reward"] is None for r in results)
    assert "timeout_s" in results[0]["error"]["message"]
    assert short_s < ENGINE_SECONDS - 1.0  # it answered at its deadline, not when the engine was done
    assert full.status_code == 200, full.text
    assert [r["error"] for r in full.json()["results"]] == [None, None]
    page = httpx.get(f"{slow_url}/metrics").text
    assert metric_value(page, "firm_items_total", task="edit", outcome="deadline") == 2


@pytest.mark.parametrize("timeout", [-1, 0, "soon", 1e9])
def test_a_malformed_or_negative_deadline_is_refused(slow_url: str, timeout: object) -> None:
    response = httpx.post(f"{slow_url}/v1/edit/score_group", json=_group(timeout_s=timeout), timeout=30)
    assert response.status_code == 422, response.text
    assert "timeout_s" in response.text


def test_the_deadline_is_in_the_api_schema(slow_url: str) -> None:
    schema = httpx.get(f"{slow_url}/openapi.json").json()["components"]["schemas"]
    field = schema["EditGroupRequest"]["properties"]["timeout_s"]
    assert "deadline" in field["description"]


def test_a_generous_deadline_changes_nothing(slow_url: str) -> None:
    response = httpx.post(f"{slow_url}/v1/edit/score_group", json=_group(timeout_s=60), timeout=60)
    assert response.status_code == 200
    assert [r["error"] for r in response.json()["results"]] == [None, None]


def test_the_client_carries_the_deadline_and_waits_a_little_longer() -> None:
    """The body carries timeout_s; the client's own wait for that call follows it (with a margin for the
    answer to travel), so the server answers the late items before the client gives up on the call."""
    from clients.client import RewardClient, call_deadline

    seen: list[tuple[dict[str, object], dict[str, float]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((json.loads(request.content), request.extensions["timeout"]))
        return httpx.Response(422, json={"error": {"code": "invalid_request", "message": "refused"}})  # no retry

    with RewardClient("http://firm", http_transport=httpx.MockTransport(handler), timeout_s=600) as client:
        client.score_edit_group(picture("blue"), "Make it red.", [picture("red")], timeout_s=3.0)
        client.score_edit_group(picture("blue"), "Make it red.", [picture("red")])
    (with_deadline, waited), (without, waited_plain) = seen[0], seen[-1]
    assert with_deadline["timeout_s"] == 3.0 and "timeout_s" not in without
    assert 3.0 < waited["read"] <= call_deadline(3.0) < 600  # the call's own wait, not the client's 600 s
    assert waited_plain["read"] > call_deadline(3.0)


def test_the_adapters_pass_the_deadline_on(slow_url: str) -> None:
    from clients.adapters.flow_grpo import edit_reward_fn
    from clients.client import RewardClient

    with RewardClient(slow_url) as client:
        reward_fn = edit_reward_fn(client, on_failure="nan", timeout_s=1.0)
        started = time.monotonic()
        rewards, info = reward_fn(
            [picture("red"), picture("green")], ["Make it red."] * 2, ref_images=[picture("blue")] * 2
        )
        elapsed = time.monotonic() - started
    assert all(math.isnan(r) for r in rewards["avg"])
    assert [i for i, _ in info["errors"]] == [0, 1] and "deadline" in info["errors"][0][1]
    assert elapsed < ENGINE_SECONDS - 1.0
