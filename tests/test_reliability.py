"""Keys, admission control, deadlines, shared calls, idempotent retries, logs, audit and graceful drain,
over HTTP against real firm-serve processes on the tiny critic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clients.images import encode
from tests.support import b64, free_port, metric_value, picture, running_server

SCORING_KEY = "trainer-key-0123456789"
OTHER_KEY = "other-key-9876543210"
ADMIN_KEY = "admin-key-0123456789ab"


def _gen(prompt: str = "a red square", colour: str = "red", n: int = 1) -> dict:
    return {"items": [{"image": b64(colour), "prompt": prompt} for _ in range(n)]}


def _unique(i: int, n: int = 1) -> dict:
    """Items no cache can answer: each prompt is new."""
    return {"items": [{"image": b64("red"), "prompt": f"a red square ({i}.{k})"} for k in range(n)]}


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait until `condition()` holds; fail, naming `what`, if it does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


def _wait_for_metrics(url: str, holds: Callable[[str], bool], what: str, timeout_s: float = 60.0) -> str:
    """The /metrics page once `holds(page)` (see `_wait_for`)."""
    page = ""

    def holds_now() -> bool:
        nonlocal page
        page = _metrics(url)
        return holds(page)

    _wait_for(holds_now, what, timeout_s)
    return page


# ---------------------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def keyed_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    args = ("--api-keys", f"trainer:{SCORING_KEY},other:{OTHER_KEY}", "--admin-key", ADMIN_KEY, "--protect-metrics")
    with running_server(cache_dir, *args) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "method", "key", "status"),
    [
        ("/v1/gen/score", "post", None, 401),
        ("/v1/gen/score", "post", "not-a-key", 401),
        ("/v1/gen/score", "post", SCORING_KEY, 200),
        ("/v1/gen/score", "post", ADMIN_KEY, 200),
        ("/v1/models", "get", None, 401),
        ("/metrics", "get", None, 401),
        ("/metrics", "get", SCORING_KEY, 200),
        ("/openapi.json", "get", None, 401),
        ("/healthz", "get", None, 200),
        ("/readyz", "get", None, 200),
        ("/v1/admin/wake", "post", None, 401),
        ("/v1/admin/wake", "post", SCORING_KEY, 403),
        ("/v1/admin/wake", "post", ADMIN_KEY, 200),
    ],
)
def test_keys_and_scopes(keyed_url: str, path: str, method: str, key: str | None, status: int) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = _gen() if path == "/v1/gen/score" else None
    response = httpx.request(method.upper(), f"{keyed_url}{path}", headers=headers, timeout=60, json=body)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"


def test_logs_name_the_key_and_never_show_it(keyed_url: str, cache_dir: Path) -> None:
    headers = {"Authorization": f"Bearer {SCORING_KEY}", "X-Request-ID": "keyed-log-1"}
    assert httpx.post(f"{keyed_url}/v1/gen/score", json=_gen(), headers=headers, timeout=60).status_code == 200
    log = (cache_dir / f"server-{keyed_url.rsplit(':', 1)[1]}.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "keyed-log-1" and line.get("key") == "trainer" for line in lines)
    assert SCORING_KEY not in log and ADMIN_KEY not in log


def test_an_unauthenticated_body_is_refused_before_it_is_read(keyed_url: str) -> None:
    response = httpx.post(
        f"{keyed_url}/v1/gen/score", content=b"x" * 5_000_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 401


def test_a_public_address_without_keys_needs_insecure(cache_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "--insecure" in result.stderr


# ---------------------------------------------------------------------------- load


@pytest.fixture(scope="module")
def small_queue_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[tuple[str, int]]:
    args = ("--max-queue", "8", "--max-batch-size", "4")
    with running_server(cache_dir, *args) as url:
        yield url, _pid_of(url)


def _pid_of(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    return int(out.split("pid=")[1].split(",")[0])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_a_burst_past_the_queue_gets_429_and_the_accepted_requests_complete(small_queue_url: tuple[str, int]) -> None:
    url, pid = small_queue_url
    before = _rss_mib(pid)
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(
            pool.map(lambda i: httpx.post(f"{url}/v1/gen/score", json=_unique(i, 2), timeout=60), range(64))
        )
    codes = [r.status_code for r in responses]
    assert codes.count(429) > 0, codes
    assert set(codes) <= {200, 429}, codes
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "overloaded" and response.json()["error"]["limit"] == 8
            assert 1 <= int(response.headers["retry-after"]) <= 60
        elif response.status_code == 200:
            assert all(r["reward"] is not None or r["error"] for r in response.json()["results"])
    assert _rss_mib(pid) - before < 300  # memory stays bounded under the burst
    page = httpx.get(f"{url}/metrics").text
    assert metric_value(page, "firm_rejected_requests_total", reason="overloaded") == codes.count(429)


def test_past_the_server_deadline_a_request_gets_504_and_its_work_is_cancelled(
    tiny_checkpoint: Path, cache_dir: Path
) -> None:
    # one judge call per batch and a 0.25 s deadline: 9 distinct calls (8 prompts, and one quality call
    # for the 8 identical images) cannot finish in time; no canaries, so every engine call counted is the request's
    args = ("--request-timeout-s", "0.25", "--max-batch-size", "1", "--no-canaries")
    with running_server(cache_dir, *args) as url:
        response = httpx.post(f"{url}/v1/gen/score", json=_unique(1000, 8), timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        page = _wait_for_metrics(
            url,
            lambda p: metric_value(p, "firm_queue_depth") == 0 and metric_value(p, "firm_requests_in_flight") == 0,
            "the request's calls have left the queue",
        )
    ran, cancelled = (
        metric_value(page, "firm_engine_batch_size_count"),
        metric_value(page, "firm_cancelled_calls_total"),
    )
    assert ran < 9  # queued calls never reached the engine
    assert cancelled > 0
    assert 9 <= ran + cancelled <= 10  # each call was answered or cancelled; the one on the engine may be both
    assert metric_value(page, "firm_rejected_requests_total", reason="deadline") == 1


# ---------------------------------------------------------------------------- sharing and retries


def test_identical_calls_are_computed_once(server_url: str) -> None:
    image = picture("red")
    image.putpixel((0, 0), (1, 2, 3))  # an image no earlier test has sent, so nothing is cached yet
    item = {"image": encode(image), "prompt": "a red square (shared)"}
    body = {"items": [item] * 3}  # three identical items in one request
    before = _metrics(server_url)
    first = httpx.post(f"{server_url}/v1/gen/score", json=body, timeout=60).json()
    between = _metrics(server_url)
    second = httpx.post(f"{server_url}/v1/gen/score", json=body, timeout=60).json()
    after = _metrics(server_url)
    hits = lambda page: metric_value(page, "firm_cache_hits_total")  # noqa: E731
    batches = lambda page: metric_value(page, "firm_engine_batch_size_sum")  # noqa: E731
    assert batches(between) - batches(before) == 2  # 2 judge calls ran for 3 items
    assert hits(between) - hits(before) == 4
    assert batches(after) == batches(between)  # the repeat came from the cache
    assert first["results"] == second["results"]


def test_a_retry_with_the_same_request_id_gets_the_first_answer(server_url: str) -> None:
    headers = {"X-Request-ID": "retry-test-7f3a"}
    before = metric_value(_metrics(server_url), "firm_replayed_requests_total")
    first = httpx.post(f"{server_url}/v1/gen/score", json=_unique(5000), headers=headers, timeout=60)
    again = httpx.post(f"{server_url}/v1/gen/score", json=_unique(5000), headers=headers, timeout=60)
    assert first.headers["x-request-id"] == "retry-test-7f3a"
    assert first.json() == again.json()
    assert metric_value(_metrics(server_url), "firm_replayed_requests_total") == before + 1


def test_a_request_id_reused_by_another_caller_gets_its_own_scores(keyed_url: str) -> None:
    def post(key: str, body: dict) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "shared-id-1"}
        return httpx.post(f"{keyed_url}/v1/gen/score", json=body, headers=headers, timeout=60)

    mine, theirs = _unique(6000), _unique(6001)
    theirs["items"][0]["id"] = "their-item"
    assert post(SCORING_KEY, mine).status_code == 200
    reply = post(OTHER_KEY, theirs)
    assert reply.status_code == 200 and reply.json()["results"][0]["id"] == "their-item"


# ---------------------------------------------------------------------------- logs


def test_logs_are_json_lines_with_the_request_id_and_the_audit_log_has_each_item(
    tiny_checkpoint: Path, cache_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    with running_server(cache_dir, "--audit-log", str(audit)) as url:
        body = {
            "items": [
                {"id": "a1", "image": b64("red"), "prompt": "a red square"},
                {"id": "a2", "image": "aGVsbG8=", "prompt": "a red square"},
            ]
        }
        reply = httpx.post(f"{url}/v1/gen/score", json=body, headers={"X-Request-ID": "log-test-42"}, timeout=60)
        port = url.rsplit(":", 1)[1]
    assert reply.json()["results"][0]["instruction_following"]["reasoning"] is None  # not asked for
    lines = [
        json.loads(line) for line in (cache_dir / f"server-{port}.log").read_text().splitlines() if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("request_id") == "log-test-42"]
    assert mine and "gen/score: 2 items, 1 failed" in mine[0]["message"]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a1", "a2"]
    assert records[0]["request_id"] == "log-test-42" and records[0]["model"] == "tiny-random"
    assert records[0]["instruction_following"]["reasoning"]  # the audit keeps the reasoning
    assert records[1]["error"]["code"] == "invalid_image"
    assert b64("red")[:40] not in audit.read_text()  # no image bytes


# ---------------------------------------------------------------------------- shutdown


def _fate(future: Future[httpx.Response]) -> str:
    """What became of a request sent before SIGTERM: answered in full, refused (503 not_ready: the drain
    began before the server took it, which a client retries elsewhere), or lost (anything else)."""
    try:
        response = future.result()
    except httpx.TransportError as exc:
        return f"lost: {type(exc).__name__}"
    if response.status_code == 503 and response.json()["error"]["code"] == "not_ready":
        return "refused"
    if response.status_code != 200:
        return f"lost: {response.status_code} {response.text[:200]}"
    if any(item["reward"] is None for item in response.json()["results"]):
        return "lost: an item without a reward"
    return "answered"


def _answered(page: str) -> float:
    return metric_value(page, "firm_requests_total", route="/v1/gen/score", status="200")


def test_sigterm_during_load_loses_no_accepted_request(tiny_checkpoint: Path, cache_dir: Path) -> None:
    sent = 8
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "--tiny", "--cache-dir", str(cache_dir), "--port", str(port)]
    with (cache_dir / f"drain-{port}.log").open("w") as log:
        process = subprocess.Popen(
            [*command, "--max-batch-size", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(url, process)
            answered_before = _answered(_metrics(url))
            with ThreadPoolExecutor(max_workers=sent) as pool:
                futures = [
                    pool.submit(httpx.post, f"{url}/v1/gen/score", json=_unique(9000 + i, 4), timeout=120)
                    for i in range(sent)
                ]
                # every request has been taken: in flight now, or (on a slow client) already answered
                _wait_for_metrics(
                    url,
                    lambda p: metric_value(p, "firm_requests_in_flight") + _answered(p) - answered_before == sent,
                    f"the server has taken all {sent} requests",
                )
                process.send_signal(signal.SIGTERM)
                try:
                    _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, "readiness turns false")
                    late = httpx.post(f"{url}/v1/gen/score", json=_unique(9999), timeout=30)
                    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
                except httpx.TransportError:
                    pass  # already closed: also a refusal, not a loss
                fates = [_fate(f) for f in futures]
            # all were taken before the signal, so none may be refused, and none lost
            assert fates == ["answered"] * sent, fates
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


def _wait_until_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"firm-serve exited with {process.returncode}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(ready, "firm-serve is ready", timeout_s=240)
