"""The openai engine end to end: firm-serve -> two OpenAI-compatible stub servers, over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients.protocol import EditGroupResponse, EditScoreResponse, GenScoreResponse, ModelsResponse
from server.engines.openai import _token_offsets
from server.rewards import cme_reward, qma_reward
from tests.support import b64, free_port, running_server

EXPECTED_4 = 3 * 0.2 + 4 * 0.7 + 5 * 0.1  # the stub's spread around a written 4
EXPECTED_5 = (4 * 0.2 + 5 * 0.7) / 0.9
EXPECTED_3 = 2 * 0.2 + 3 * 0.7 + 4 * 0.1


@pytest.fixture(scope="module")
def stubs() -> Iterator[list[str]]:
    processes, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            processes.append(subprocess.Popen([sys.executable, "-m", "tests.openai_stub", "--port", str(port)]))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(autouse=True)
def healthy_stubs(stubs: list[str]) -> None:
    for url in stubs:
        httpx.post(f"{url}/control", json={"fail": False, "delay": 0.0})


def _served(stubs: list[str], cache_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    urls = ",".join(f"{u}/v1" for u in stubs)
    args = ["--engine", "openai", "--openai-base-urls", urls, "--edit-model", "critic-edit"]
    args += ["--gen-model", "critic-gen", "--openai-timeout-s", "1", "--openai-max-retries", "2", *extra]
    return running_server(cache_dir, *args, tiny=False)


@pytest.fixture(scope="module")
def server_url(stubs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _served(stubs, tmp_path_factory.mktemp("openai")) as url:
        yield url


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/stats").json()


def _edit_body(n: int = 1) -> dict:
    # a new instruction each time, so the server's cache of identical calls cannot answer
    item = {"source": b64("blue"), "edited": b64("red"), "instruction": f"Make the square red ({uuid.uuid4().hex})."}
    return {"items": [{"id": f"i{i}", **item} for i in range(n)]}


def test_scores_and_expected_values_come_from_the_remote_answers(server_url: str) -> None:
    # the stub's edit answer has two characters split over two tokens each before the score: the
    # expected value is still read at the score digit
    response = httpx.post(f"{server_url}/v1/edit/score", json=_edit_body(), timeout=30)
    assert response.status_code == 200, response.text
    (result,) = EditScoreResponse.model_validate(response.json()).results
    assert result.execution is not None and result.consistency is not None
    assert (result.execution.score, result.consistency.score) == (4, 4)
    assert result.execution.expected == pytest.approx(EXPECTED_4)
    assert result.reward == pytest.approx(cme_reward(4, 4))

    response = httpx.post(
        f"{server_url}/v1/gen/score", json={"items": [{"image": b64("red"), "prompt": "a red square"}]}, timeout=30
    )
    (gen,) = GenScoreResponse.model_validate(response.json()).results
    assert gen.instruction_following is not None and gen.quality is not None
    assert gen.instruction_following.expected == pytest.approx(EXPECTED_5)
    assert gen.quality.score == 3 and gen.quality.expected == pytest.approx(EXPECTED_3)
    assert gen.reward == pytest.approx(qma_reward(5, 3))


def test_requests_carry_greedy_decoding_logprobs_and_images_in_judge_order(server_url: str, stubs: list[str]) -> None:
    httpx.post(f"{server_url}/v1/edit/score", json=_edit_body(), timeout=30)
    bodies = [b for b in (_stats(u)["last"] for u in stubs) if b and b["model"] == "critic-edit"]
    body = bodies[0]
    assert (body["temperature"], body["seed"], body["max_completion_tokens"]) == (0.0, 0, 256)
    assert (body["presence_penalty"], body["frequency_penalty"], body["repetition_penalty"]) == (0.0, 0.0, 1.0)
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert "logprob_token_ids" not in body  # the stub has no /tokenize to name the digits' ids
    assert "structured_outputs" not in body
    content = body["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in content[:2])
    assert content[0]["image_url"]["url"] != content[1]["image_url"]["url"]  # source, then edited


PIECE = "\ufffd"


@pytest.mark.parametrize(
    ("tokens", "raw"),
    [
        (["é", "4"], None),  # whole characters
        ([PIECE, PIECE, "4"], None),  # é split over two tokens, shown as U+FFFD each
        ([PIECE, PIECE + "a", "4"], None),  # the second piece carries the next character along
        (["bytes:\\xc3", "bytes:\\xa9", "4"], [b"\xc3", b"\xa9", b"4"]),  # exact bytes sent
    ],
    ids=["whole", "pieces", "piece-and-letter", "bytes"],
)
def test_digit_offsets_survive_characters_split_over_tokens(tokens: list[str], raw: list[bytes] | None) -> None:
    text = "é" + ("a" if PIECE + "a" in tokens else "") + "4"
    entries = [{"token": t, "logprob": 0.0} for t in tokens]
    if raw is not None:
        for entry, b in zip(entries, raw, strict=True):
            entry["bytes"] = list(b)
    offsets = _token_offsets(text, entries)
    assert offsets[-1] == text.index("4")


def test_calls_are_spread_over_both_urls(server_url: str, stubs: list[str]) -> None:
    before = [_stats(u)["requests"] for u in stubs]
    body = {"source": b64("blue"), "instruction": "Make the square red.", "candidates": [b64("red")] * 8}
    response = httpx.post(f"{server_url}/v1/edit/score_group", json=body, timeout=30)
    assert response.status_code == 200
    assert EditGroupResponse.model_validate(response.json()).group.scored == 8
    after = [_stats(u)["requests"] for u in stubs]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


@pytest.mark.parametrize("trouble", [{"fail": True}, {"delay": 3.0}], ids=["failing", "slow"])
def test_a_failing_or_slow_url_is_retried_on_the_other(stubs: list[str], tmp_path: Path, trouble: dict) -> None:
    httpx.post(f"{stubs[0]}/control", json=trouble)
    before = _stats(stubs[0])["requests"]
    with _served(stubs, tmp_path) as url:  # a fresh server: no URL is cooling down yet
        response = httpx.post(f"{url}/v1/edit/score", json=_edit_body(4), timeout=60)
    assert response.status_code == 200
    results = EditScoreResponse.model_validate(response.json()).results
    assert all(r.error is None and r.reward is not None for r in results), [r.error for r in results]
    assert _stats(stubs[0])["requests"] > before  # the troubled URL was tried


def test_when_every_url_fails_items_fail_with_engine_error_not_zero(server_url: str, stubs: list[str]) -> None:
    for url in stubs:
        httpx.post(f"{url}/control", json={"fail": True})
    response = httpx.post(f"{server_url}/v1/edit/score", json=_edit_body(), timeout=60)
    assert response.status_code == 200
    (result,) = EditScoreResponse.model_validate(response.json()).results
    assert result.reward is None
    assert result.error is not None and result.error.code == "engine_error"
    assert "attempts failed" in result.error.message and "HTTP 503" in result.error.message


def test_models_route_names_the_engine(server_url: str) -> None:
    models = ModelsResponse.model_validate(httpx.get(f"{server_url}/v1/models").json()).models
    assert {(m.name, m.engine, m.engine_reason) for m in models} == {
        ("critic-edit", "openai", "chosen in the settings"),
        ("critic-gen", "openai", "chosen in the settings"),
    }


def test_structured_outputs_send_each_judges_format(stubs: list[str], tmp_path: Path) -> None:
    with _served(stubs, tmp_path, "--structured-outputs") as url:
        httpx.post(f"{url}/v1/gen/score", json={"items": [{"image": b64("red"), "prompt": "p"}]}, timeout=30)
        httpx.post(f"{url}/v1/edit/score", json=_edit_body(), timeout=30)
    formats = []
    for stub in stubs:
        body = _stats(stub)["last"]
        formats.append(body["structured_outputs"])
    seen = {key for f in formats for key in f}
    assert seen <= {"json", "regex"} and seen
    for f in formats:
        if "json" in f:
            assert f["json"]["type"] == "object"
        else:
            assert "boxed" in f["regex"]
