"""The failover transport and the retry loop above it, driven by httpx.MockTransport: milliseconds, no sockets.

Each mock replica answers POSTs from its own script and GET /readyz with its own readiness; the
clock of the rests and the retry loop's sleeps are the test's own, so nothing waits for real.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from clients import AsyncRewardClient, RewardClient
from clients.config import ClientConfig
from clients.errors import DeadlineExceeded, FirmError, Overloaded, RequestFailed, ServerFault
from clients.protocol import RewardWeights
from clients.retry import RetryPolicy
from clients.transport import ORIGIN, FailoverTransport, send_with_retries
from tests.support import picture

POLICY = RetryPolicy(max_attempts=4, backoff_s=0.5, max_backoff_s=30.0, jitter=0.0)
Answer = httpx.Response | Exception
OK = httpx.Response(200, json={"ok": True})


def _error(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers, json={"error": {"code": f"e{status}", "message": "injected"}})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replicas:
    """Mock servers `a`, `b`, ... behind one MockTransport. A replica answers each POST with the next answer
    of its script (the last one repeats) and /readyz with the next of its readiness statuses (200 when none
    is left); every request is logged as (method, host, path) with its headers."""

    def __init__(self, **scripts: list[Answer]) -> None:
        self.scripts = {host: list(answers) for host, answers in scripts.items()}
        self.posts = dict.fromkeys(scripts, 0)
        self.readiness: dict[str, list[int]] = {host: [] for host in scripts}
        self.log: list[tuple[str, str, str]] = []
        self.headers: list[httpx.Headers] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://{host}:8000" for host in self.scripts]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.log.append((request.method, host, request.url.path))
        self.headers.append(request.headers)
        if request.url.path == "/readyz":
            statuses = self.readiness[host]
            return httpx.Response(statuses.pop(0) if statuses else 200, json={"ready": True, "models": {}})
        script = self.scripts[host]
        answer = script[min(self.posts[host], len(script) - 1)]
        self.posts[host] += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def hosts(self, method: str = "POST") -> list[str]:
        return [host for m, host, _ in self.log if m == method]


def _transport(replicas: Replicas, clock: Clock | None = None, cooldown_s: float = 10.0) -> FailoverTransport:
    return FailoverTransport(
        replicas.urls, cooldown_s=cooldown_s, transport=httpx.MockTransport(replicas), clock=clock or Clock()
    )


def _post(
    transport: FailoverTransport, *, policy: RetryPolicy = POLICY, timeout_s: float = 60.0
) -> tuple[httpx.Response | FirmError, list[float]]:
    """One POST through the retry loop: its answer (or the error it raised) and the waits it asked for."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(base_url=ORIGIN, transport=transport) as http:
            request = http.build_request("POST", "/v1/gen/score", json={"items": []})
            return await send_with_retries(
                http, request, policy, timeout_s=timeout_s, can_fail_over=transport.can_fail_over, sleep=sleep
            )

    try:
        return asyncio.run(call()), waits
    except FirmError as exc:  # the test asserts on the error itself
        return exc, waits


def test_429_with_retry_after_is_honoured_and_retries_share_a_request_id() -> None:
    replicas = Replicas(a=[_error(429, "7"), _error(429, "90"), _error(503), OK])
    answer, waits = _post(_transport(replicas))
    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert waits == [7.0, 30.0, 2.0]  # Retry-After, capped at max_backoff_s; then the backoff of attempt 2
    ids = {headers["x-request-id"] for headers in replicas.headers}
    assert len(ids) == 1 and "" not in ids


@pytest.mark.parametrize(
    ("status", "rests", "wait"),
    [(503, True, 0.5), (502, True, 0.5), (500, False, 0.5), (429, False, 0.5), (504, False, 0.0)],
)
def test_a_passing_fault_is_retried_and_only_502_503_rest_the_replica(status: int, rests: bool, wait: float) -> None:
    """An overloaded or faulting service gets time, even with another replica awake; a 504 (the server's
    own deadline passed) is tried again at once, elsewhere when 502 or 503 rested the replica."""
    replicas = Replicas(a=[_error(status), OK], b=[OK])
    transport = _transport(replicas)
    answer, waits = _post(transport)
    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert waits == [wait]
    assert replicas.hosts() == (["a", "b"] if rests else ["a", "a"])
    assert transport.replicas[0].check_ready is rests


def test_a_lone_server_answering_504_gets_its_retry_after_a_wait() -> None:
    """With no other replica to fail over to, a 504 is not followed by an attempt at once on the same server."""
    replicas = Replicas(a=[_error(504), OK])
    answer, waits = _post(_transport(replicas))
    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert waits == [0.5] and replicas.hosts() == ["a", "a"]


@pytest.mark.parametrize(
    "failure",
    [httpx.RemoteProtocolError("server disconnected"), httpx.ReadError("connection reset"), httpx.ReadTimeout("")],
)
def test_a_dropped_connection_or_a_timeout_fails_over_at_once(failure: Exception) -> None:
    replicas = Replicas(a=[failure], b=[OK])
    transport = _transport(replicas)
    answer, waits = _post(transport)
    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert replicas.hosts() == ["a", "b"] and waits == [0.0]  # the failure was a's own: b, without waiting
    assert transport.awake() == [transport.replicas[1]]


@pytest.mark.parametrize(
    ("failure", "error"),
    [(httpx.ConnectError("refused"), RequestFailed), (httpx.ReadTimeout("slow"), DeadlineExceeded)],
)
def test_a_lone_replica_that_keeps_failing_is_retried_with_backoff_then_fails(
    failure: Exception, error: type[Exception]
) -> None:
    replicas = Replicas(a=[failure])
    answer, waits = _post(_transport(replicas))
    assert isinstance(answer, RequestFailed) and "4 attempts failed" in str(answer)
    assert isinstance(answer.__cause__, error) and "http://a:8000" in str(answer.__cause__)
    assert replicas.hosts() == ["a"] * 4  # resting never stops the retries of a single server
    assert waits == [0.5, 1.0, 2.0]


def test_one_replica_down_while_another_is_up_costs_one_failed_attempt() -> None:
    replicas = Replicas(a=[httpx.ConnectError("refused")], b=[OK])
    transport = _transport(replicas)
    for _ in range(5):
        answer, _ = _post(transport)
        assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert replicas.hosts() == ["a"] + ["b"] * 5  # a rests: no call tries it again within its cool-down


def test_a_rested_replica_gets_requests_again_only_once_its_readyz_says_so() -> None:
    clock = Clock()
    replicas = Replicas(a=[httpx.ConnectError("refused"), OK], b=[OK])
    replicas.readiness["a"] = [503]  # still loading after its first rest
    transport = _transport(replicas, clock)
    _post(transport)
    assert replicas.log == [("POST", "a", "/v1/gen/score"), ("POST", "b", "/v1/gen/score")]
    clock.now += 11  # the rest is over: a's readiness is checked, it is not ready, it rests again
    _post(transport)
    assert replicas.log[2:] == [("GET", "a", "/readyz"), ("POST", "b", "/v1/gen/score")]
    clock.now += 5  # resting: not even asked
    _post(transport)
    assert replicas.log[4:] == [("POST", "b", "/v1/gen/score")]
    clock.now += 6
    _post(transport)
    assert replicas.log[5:] == [("GET", "a", "/readyz"), ("POST", "a", "/v1/gen/score")]
    _post(transport)  # ready again: no more checks
    assert replicas.log[7:] == [("POST", "a", "/v1/gen/score")]


def test_the_readiness_check_carries_the_requests_credentials() -> None:
    clock = Clock()
    replicas = Replicas(a=[httpx.ConnectError("refused"), OK])

    async def call() -> None:
        transport = _transport(replicas, clock)
        async with httpx.AsyncClient(
            base_url=ORIGIN, transport=transport, headers={"Authorization": "Bearer k"}
        ) as http:
            with pytest.raises(httpx.ConnectError, match="http://a:8000"):
                await http.post("/v1/gen/score", json={})
            clock.now += 11
            assert (await http.post("/v1/gen/score", json={})).status_code == 200

    asyncio.run(call())
    assert [m for m, _, _ in replicas.log] == ["POST", "GET", "POST"]
    assert replicas.headers[1]["authorization"] == "Bearer k"


def test_requests_go_to_the_least_busy_replica() -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if len(hosts) == 1:
            arrived.set()
            await release.wait()  # the first request holds its replica busy
        return OK

    async def call() -> list[int]:
        transport = FailoverTransport(["http://a:1", "http://b:2"], transport=httpx.MockTransport(handler))
        async with httpx.AsyncClient(base_url=ORIGIN, transport=transport) as http:
            first = asyncio.create_task(http.get("/v1/models"))
            await asyncio.wait_for(arrived.wait(), 5)  # the first request has reached its replica
            second = await http.get("/v1/models")  # a is busy: b
            release.set()
            third = await asyncio.wait_for(first, 5)
            return [second.status_code, third.status_code]

    assert asyncio.run(asyncio.wait_for(call(), 10)) == [200, 200]
    assert hosts == ["a", "b"]


def test_a_deadline_that_leaves_no_time_for_the_wait_fails_at_once() -> None:
    replicas = Replicas(a=[_error(503, "30")])
    answer, waits = _post(_transport(replicas), timeout_s=5.0)
    assert isinstance(answer, DeadlineExceeded) and "leaves no time" in str(answer)
    assert isinstance(answer.__cause__, Overloaded) and waits == [] and replicas.posts["a"] == 1


def test_a_refusal_is_not_retried() -> None:
    replicas = Replicas(a=[_error(422), OK])
    answer, waits = _post(_transport(replicas))
    assert isinstance(answer, Exception) and "HTTP 422" in str(answer) and replicas.posts["a"] == 1 and waits == []


def test_a_persisting_fault_is_bounded_by_the_policy() -> None:
    replicas = Replicas(a=[_error(500)])
    answer, waits = _post(_transport(replicas), policy=RetryPolicy(max_attempts=2, backoff_s=0.0, jitter=0.0))
    assert isinstance(answer, RequestFailed) and isinstance(answer.__cause__, ServerFault)
    assert replicas.posts["a"] == 2 and waits == [0.0]


def _scored(request: httpx.Request) -> httpx.Response:
    n = len(json.loads(request.content)["images"])
    dim = {"score": 5, "normalized": 1.0}
    results = [{"id": str(i), "instruction_following": dim, "quality": dim, "reward": 1.0} for i in range(n)]
    group = {"mean": 1.0, "std": 0.0, "advantages": [0.0] * n, "scored": n}
    body = {"model": {"name": "c"}, "score_mode": "argmax", "weights": {"w1": 0.4, "w2": 0.6}}
    return httpx.Response(200, json={**body, "id": "g", "results": results, "group": group})


def test_the_sync_clients_submit_methods_return_futures_of_typed_replies() -> None:
    with RewardClient("http://critic", http_transport=httpx.MockTransport(_scored)) as client:
        pending = client.submit_generation_group("a red square", [picture("red")] * 3, group_id="g")
        reply = pending.result(timeout=30)
    assert reply.group.scored == 3 and reply.id == "g"


def test_a_failed_call_carries_the_requests_own_options_or_its_tasks_defaults() -> None:
    """The stand-in reply of a failed call says what the call asked for, with the task's default weights."""

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    async def call(**options: Any) -> Any:
        policy = RetryPolicy(max_attempts=1)
        async with AsyncRewardClient("http://critic", http_transport=httpx.MockTransport(down), retry=policy) as client:
            edits = await client.score_edits(picture("blue"), [picture("red")] * 3, "Make it red.", **options)
            group = await client.score_edit_group(picture("blue"), "Make it red.", [picture("red")], group_id="g")
            return edits, group

    edits, group = asyncio.run(call(ids=["x", "y", "z"], score_mode="expected"))
    assert [r.id for r in edits.results] == ["x", "y", "z"] and edits.mask() == [False] * 3
    assert edits.score_mode == "expected" and (edits.weights.w1, edits.weights.w2) == (0.6, 0.4)
    assert group.id == "g" and group.group.advantages == [None] and group.score_mode == "argmax"
    edits, _ = asyncio.run(call(weights=RewardWeights(w1=1.0, w2=1.0)))
    assert (edits.weights.w1, edits.weights.w2) == (1.0, 1.0)


def test_the_constructor_takes_a_config_or_options_not_both() -> None:
    config = ClientConfig(base_urls=("http://a:1",), chunk_size=5)
    assert ClientConfig.of(config) is config
    assert ClientConfig.of(None, {"FIRM_CHUNK_SIZE": "9"}, max_in_flight=2).chunk_size == 9
    with pytest.raises(ValueError, match="chunk_size"):
        AsyncRewardClient(config=config, chunk_size=3)
