"""Every way a scoring call can fail, through httpx's MockTransport: never a raise when not strict.

A training loop must not stop because the reward server answered badly. Not strict, each failure
of a call is a reply whose items have a null reward and the error; strict, it raises the typed
error. Passing faults (500, 502, 503, 504, 429, dropped connections) are retried within the policy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from clients import AsyncRewardClient
from clients.errors import (
    BadRequest,
    BadResponse,
    FirmError,
    NotFound,
    PayloadTooLarge,
    RequestFailed,
    ServerError,
    Unauthorized,
)
from clients.protocol import GenGroupResponse, GenScoreResponse
from clients.retry import RetryPolicy
from tests.support import picture

RETRY = RetryPolicy(max_attempts=3, backoff_s=0.0, max_backoff_s=0.0, jitter=0.0)
Handler = Callable[[httpx.Request], httpx.Response]


def _error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": f"injected {status}"}})


def _gen_result(i: int) -> dict[str, Any]:
    dim = {"score": 5, "expected": None, "normalized": 1.0}
    return {"id": str(i), "instruction_following": dim, "quality": dim, "reward": 1.0, "error": None}


def _ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    n = len(body["images"]) if "images" in body else len(body["items"])
    reply: dict[str, Any] = {
        "model": {"name": "critic"},
        "score_mode": "argmax",
        "weights": {"w1": 0.4, "w2": 0.6},
        "results": [_gen_result(i) for i in range(n)],
    }
    if "images" in body:
        reply["group"] = {"mean": 1.0, "std": 0.0, "advantages": [0.0] * n, "scored": n}
    return httpx.Response(200, json=reply)


class Script:
    """Answers POSTs from a list of responses (the last one repeats), counting them; GETs (/readyz) get 200."""

    def __init__(self, *answers: httpx.Response | Handler | Exception) -> None:
        self.answers = list(answers)
        self.posts = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"ready": True, "models": {}})
        answer = self.answers[min(self.posts, len(self.answers) - 1)]
        self.posts += 1
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def _score(script: Script, *, strict: bool = False, group: bool = True) -> GenGroupResponse | GenScoreResponse:
    async def call() -> GenGroupResponse | GenScoreResponse:
        transport = httpx.MockTransport(script)
        async with AsyncRewardClient(
            "http://critic", http_transport=transport, retry=RETRY, strict=strict, cooldown_s=0.0
        ) as client:
            images = [picture("red"), picture("blue")]
            if group:
                return await client.score_generation_group("a red square", images)
            return await client.score_generations(images, "a red square")

    return asyncio.run(call())


def _assert_failed(reply: GenGroupResponse | GenScoreResponse, words: str) -> None:
    assert [r.reward for r in reply.results] == [None, None]
    assert all(r.error is not None and r.error.code == "request_failed" for r in reply.results)
    assert all(words in str(r.error) for r in reply.results), reply.results[0].error


REFUSALS = [
    (401, "unauthorized", Unauthorized),
    (403, "forbidden", Unauthorized),
    (404, "model_disabled", NotFound),
    (413, "too_large", PayloadTooLarge),
    (422, "invalid_request", BadRequest),
    (400, "bad", ServerError),
    (501, "not_implemented", ServerError),
]


@pytest.mark.parametrize(("status", "code", "error"), REFUSALS)
@pytest.mark.parametrize("group", [True, False])
def test_a_refusal_is_null_rewards_not_a_raise(status: int, code: str, error: type[Exception], group: bool) -> None:
    script = Script(_error(status, code))
    reply = _score(script, group=group)
    _assert_failed(reply, f"HTTP {status}")
    assert script.posts == 1  # the same request would get the same answer: not retried
    if group:
        assert reply.group.advantages == [None, None] and reply.group.scored == 0  # type: ignore[union-attr]
    with pytest.raises(error, match=str(status)):
        _score(Script(_error(status, code)), strict=True, group=group)


@pytest.mark.parametrize(("status", "code"), [(500, "internal_error"), (502, "bad_gateway"), (503, "not_ready"),
                                              (504, "deadline_exceeded"), (429, "overloaded")])  # fmt: skip
def test_a_passing_fault_is_retried_then_scores(status: int, code: str) -> None:
    script = Script(_error(status, code), _ok)
    reply = _score(script)
    assert script.posts == 2 and [r.reward for r in reply.results] == [1.0, 1.0]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_fault_that_persists_is_bounded_by_the_policy_then_null(status: int) -> None:
    script = Script(_error(status, "fault"))
    _assert_failed(_score(script), f"HTTP {status}")
    assert script.posts == RETRY.max_attempts
    with pytest.raises(RequestFailed, match=f"{RETRY.max_attempts} attempts failed"):
        _score(Script(_error(status, "fault")), strict=True)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (httpx.Response(500, text="<html>proxy error</html>"), "HTTP 500"),  # an error body that is not ours
        (httpx.ConnectError("connection refused"), "ConnectError"),
        (httpx.ReadError("connection reset"), "ReadError"),
        (httpx.RemoteProtocolError("server disconnected"), "RemoteProtocolError"),
    ],
)
def test_transport_errors_are_retried_then_null(answer: httpx.Response | Exception, words: str) -> None:
    script = Script(answer)
    _assert_failed(_score(script), words)
    assert script.posts == RETRY.max_attempts


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (httpx.Response(200, text="not json"), "not JSON"),
        (httpx.Response(200, json=[1, 2]), "not a JSON object"),
        (httpx.Response(200, json={"results": "nope"}), "does not match the protocol"),
        (lambda r: httpx.Response(200, json={**json.loads(_ok(r).content), "results": []}), "0 results for 2"),
    ],
)
@pytest.mark.parametrize("group", [True, False])
def test_a_body_that_is_not_the_reply_is_null_not_a_raise(answer: Any, words: str, group: bool) -> None:
    script = Script(answer)
    _assert_failed(_score(script, group=group), words)
    assert script.posts == 1
    with pytest.raises(BadResponse):
        _score(Script(answer), strict=True, group=group)


def test_every_firm_error_is_caught_not_only_the_known_ones() -> None:
    """The contract adapters rely on: a non-strict call raises nothing of the client's own."""
    for status in (300, 400, 401, 402, 404, 405, 409, 410, 413, 418, 422, 500, 501, 502, 503, 504, 599):
        reply = _score(Script(_error(status, "x")))
        assert reply.mask() == [False, False]
    assert issubclass(BadResponse, FirmError) and issubclass(RequestFailed, FirmError)


def test_readiness_reads_each_tasks_state_from_a_503_too() -> None:
    def readyz(status: int, body: dict[str, Any]) -> Handler:
        return lambda request: httpx.Response(status, json=body)

    async def ask(handler: Handler) -> Any:
        async with AsyncRewardClient("http://critic", http_transport=httpx.MockTransport(handler)) as client:
            return await client.readiness()

    report = asyncio.run(ask(readyz(503, {"ready": False, "models": {"gen": "loading", "edit": "ready"}})))
    assert report.models == {"gen": "loading", "edit": "ready"} and not report.ready
    with pytest.raises(Unauthorized):
        asyncio.run(ask(readyz(401, {"error": {"code": "unauthorized", "message": "no key"}})))
    with pytest.raises(BadResponse):
        asyncio.run(ask(readyz(200, {"unexpected": 1})))


def test_models_raises_the_typed_error_of_a_refusal() -> None:
    """`models()` maps a refusal like the scoring calls do: a wrong key is Unauthorized, not an httpx error."""

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "missing or wrong API key"}})

    async def ask() -> None:
        async with AsyncRewardClient("http://critic", http_transport=httpx.MockTransport(refuse)) as client:
            await client.models()

    with pytest.raises(Unauthorized):
        asyncio.run(ask())
