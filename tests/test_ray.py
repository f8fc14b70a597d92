"""The Ray Serve application on a local Ray cluster: two replicas of the tiny critic.

What a user scaling out relies on: the API's contract holds (test_contract.py's checks, run here
against the application), requests spread over the replicas (each answer names its replica), the
scoring routes answer exactly as a plain `firm-serve` does, each replica's metrics are visible
with its identity, split critics are routed by path, a replica killed under load is replaced
while the ingress (or the client's retries) loses no request, and overload is refused with 429.
The failure tests and the contract's limited deployment run on the simulated engine of
`bench/sim_engine.py`: replicas start in a second and every engine call takes half a second, so
a kill reliably catches requests in flight. The parts that need no cluster are in
test_ray_parts.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from clients import AsyncRewardClient  # noqa: E402
from clients.images import encode  # noqa: E402
from clients.retry import RetryPolicy  # noqa: E402
from deploy.ray.app import build_app  # noqa: E402
from deploy.ray.settings import RaySettings  # noqa: E402
from tests.support import b64, free_port, metric_value, picture  # noqa: E402
from tests.test_contract import BODIES, KEY, LIMITED, Contract, Target  # noqa: E402

RAY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ray"
APP, SPLIT_APP = "firm", "firm-split"
REPLICA_HEADER = "x-firm-replica"
WAIT_S = 120.0  # most any cluster change may take before the test gives up
SIM_SERVER = {"engine": "bench.sim_engine:SimulatedEngine", "edit_model": "sim", "gen_model": "sim", "max_wait_ms": 20}
SIM_APPS: dict[str, dict[str, Any]] = {
    "firm-kill": {"min_replicas": 2, "max_replicas": 2, "forward_attempts": 1},  # a dying replica's requests: 503
    "firm-resend": {"min_replicas": 2, "max_replicas": 2},  # the default forward_attempts: sent on
    "firm-limited": {  # the contract's limited deployment, with one replica taking one request at a time
        "server": {**SIM_SERVER, **LIMITED},
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
    },
}


def _server_settings(cache_dir: Path) -> dict[str, Any]:
    """The flags the plain `server_url` fixture runs with, so both answer the same."""
    return {"tiny": True, "cache_dir": str(cache_dir), "max_wait_ms": 50, "max_items_per_request": 32}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[int]:
    """A local Ray cluster with Serve's HTTP proxy on a free loopback port."""
    port = free_port()
    try:
        ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    except (RuntimeError, OSError, ConnectionError) as exc:
        pytest.skip(f"a local Ray cluster cannot start on this machine: {type(exc).__name__}: {exc}")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        ray.shutdown()  # stops the whole local cluster, Serve included


@pytest.fixture(scope="module")
def sim_urls(ray_cluster: int) -> dict[str, str]:
    """Applications of simulated critics for the failure tests and the contract's limited deployment,
    started without waiting: they come up while the tiny critic loads. Their replicas reserve no CPU, so
    they never hold back the others."""
    targets = []
    for name, layout in SIM_APPS.items():
        settings = RaySettings(**{"server": SIM_SERVER, **layout}, num_gpus=0, num_cpus=0, ingress_num_cpus=0)
        targets.append(serve.RunTarget(build_app(settings), name=name, route_prefix=f"/{name}"))
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return {name: f"http://127.0.0.1:{ray_cluster}/{name}" for name in SIM_APPS}


@pytest.fixture(scope="module")
def ray_url(ray_cluster: int, sim_urls: dict[str, str], tiny_checkpoint: Path, cache_dir: Path) -> str:
    """Both critics in each of two replicas, behind the ingress."""
    settings = RaySettings(
        server=_server_settings(cache_dir),
        num_gpus=0,
        num_cpus=1,
        min_replicas=2,
        max_replicas=2,
        health_check_period_s=1,
        metrics_push_interval_s=1,
    )
    serve.run(build_app(settings), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{ray_cluster}"


def _sim_url(sim_urls: dict[str, str], app: str) -> str:
    """The URL of a simulated application once it is running."""
    deadline = time.monotonic() + WAIT_S
    while (status := serve.status().applications.get(app)) is None or status.status != "RUNNING":
        assert time.monotonic() < deadline, f"{app} did not start: {status}"
        time.sleep(0.2)
    return sim_urls[app]


class TestRayContract(Contract):
    @pytest.fixture(scope="class")
    def target(self, ray_url: str, sim_urls: dict[str, str]) -> Target:
        why = "Ray Serve routes only to loaded replicas and serves no admin routes; its 503s: test_ray_parts.py"
        return Target(url=ray_url, limited_url=_sim_url(sim_urls, "firm-limited"), why_never_not_ready=why)


def _unique_picture(colour: str, serial: int) -> Image.Image:
    """A square of `colour` with one pixel set from `serial`: no judge call repeats, so no cache answers."""
    image = picture(colour)
    image.putpixel((0, 0), (serial % 256, serial // 256 % 256, 7))
    return image


def _unique(colour: str, serial: int) -> str:
    return encode(_unique_picture(colour, serial))


def _rounded(value: Any) -> Any:
    """Floats to 6 places: the same greedy answers, whatever the float formatting of a batch."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


async def _replicas_answering(url: str, route: str, body: dict[str, Any], requests: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        answers = await asyncio.gather(*(http.post(route, json=body) for _ in range(requests)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [a.headers[REPLICA_HEADER] for a in answers]


def _critic_actors(app: str = APP, deployment: str = "FirmCritic") -> dict[str, str]:
    """Replica id -> actor name of the live replicas of `deployment` (Ray names replica actors)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return {name.removeprefix(prefix): name for name in names}


def _running(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _both_replicas_answer(url: str, serial: int) -> set[str]:
    """Send rounds of concurrent scoring requests until both replicas have answered some."""
    seen: set[str] = set()
    for round_ in range(5):  # concurrent requests go to the less busy replica; a few rounds see both
        images = [_unique("red", serial + round_ * 10 + k) for k in range(2)]
        body = {"items": [{"image": image, "prompt": "a red square"} for image in images]}
        seen.update(asyncio.run(_replicas_answering(url, "/v1/gen/score", body, requests=8)))
        if len(seen) == 2:
            break
    return seen


def test_requests_spread_over_both_replicas(ray_url: str) -> None:
    seen = _both_replicas_answer(ray_url, serial=0)
    assert len(seen) == 2, seen
    assert all(name.startswith("FirmCritic#") for name in seen)
    assert {name.split("#")[1] for name in seen} == set(_critic_actors())


@pytest.mark.parametrize("route", list(BODIES))
def test_scoring_routes_answer_as_the_plain_server(ray_url: str, server_url: str, route: str) -> None:
    plain = httpx.post(f"{server_url}{route}", json=BODIES[route], timeout=120)
    scaled = httpx.post(f"{ray_url}{route}", json=BODIES[route], timeout=120)
    assert (scaled.status_code, plain.status_code) == (200, 200)
    assert _rounded(scaled.json()) == _rounded(plain.json())
    assert scaled.headers[REPLICA_HEADER].startswith("FirmCritic#")


def test_metrics_show_every_replica_with_its_identity(ray_url: str) -> None:
    replicas = set(_critic_actors())
    assert {name.split("#")[1] for name in _both_replicas_answer(ray_url, serial=1000)} == replicas
    deadline = time.monotonic() + WAIT_S
    while True:  # each replica shares its series every second
        page = httpx.get(f"{ray_url}/metrics").text
        labelled = {r for r in replicas if metric_value(page, "firm_items_total", replica=r) > 0}
        requests = metric_value(page, "firm_requests_total", deployment="FirmIngress", route="/v1/gen/score")
        if (labelled == replicas and requests >= 8) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert labelled == replicas, "each critic replica's scoring, labelled with the replica"
    assert requests >= 8, "the HTTP requests, counted where they arrive"
    assert REPLICA_HEADER not in httpx.get(f"{ray_url}/metrics").headers, "the page is every replica's, not one's"
    names = [family.name for family in text_string_to_metric_families(page)]
    assert len(names) == len(set(names)), "each metric family appears once, merged over the replicas"
    assert metric_value(page, "firm_items_total", deployment="FirmCritic", task="gen") > 0


def test_split_critics_are_routed_by_path(ray_cluster: int, server_url: str, cache_dir: Path) -> None:
    settings = RaySettings(server=_server_settings(cache_dir), split=True, num_gpus=0, num_cpus=0.5)
    serve.run(build_app(settings), name=SPLIT_APP, route_prefix="/split")
    url = f"http://127.0.0.1:{ray_cluster}/split"
    try:
        for route, deployment in (("/v1/edit/score", "FirmEditCritic"), ("/v1/gen/score_group", "FirmGenCritic")):
            scaled = httpx.post(f"{url}{route}", json=BODIES[route], timeout=120)
            plain = httpx.post(f"{server_url}{route}", json=BODIES[route], timeout=120)
            assert scaled.headers[REPLICA_HEADER].startswith(f"{deployment}#")
            assert _rounded(scaled.json()) == _rounded(plain.json())
        for path in ("/readyz", "/v1/models"):
            assert httpx.get(f"{url}{path}").json() == httpx.get(f"{server_url}{path}").json(), path
    finally:
        serve.delete(SPLIT_APP)


class _RecordingTransport(httpx.AsyncBaseTransport):
    """The client's HTTP transport, noting the status and error code of every scoring answer it gets."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.answers: list[tuple[int, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST":
            body = await response.aread()
            code = json.loads(body)["error"]["code"] if response.status_code != 200 else None
            self.answers.append((response.status_code, code))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _kill_a_busy_replica(app: str, steady: asyncio.Event) -> tuple[str, int]:
    """Kill the first critic replica found with requests in flight: (its id, how many it held).

    Only once answers flow: a request the replica has not yet accepted is rerouted by Ray itself,
    so a kill in the first instants might catch nothing the ingress would see.
    """
    await steady.wait()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for replica_id, name in sorted(_critic_actors(app).items()):
            actor = ray.get_actor(name, namespace="serve")
            if ongoing := await actor.get_num_ongoing_requests.remote():
                ray.kill(actor, no_restart=True)
                return replica_id, ongoing
        await asyncio.sleep(0.02)
    raise AssertionError("no critic replica ever had a request in flight")


def _score_while_killing(url: str, app: str, transport: _RecordingTransport) -> tuple[list[Any], str, int]:
    """Four closed-loop clients score three groups each while a busy replica is killed under them."""

    async def load() -> tuple[list[Any], str, int]:
        retry = RetryPolicy(max_attempts=8, backoff_s=0.25, max_backoff_s=2.0)
        async with AsyncRewardClient(
            url, timeout_s=WAIT_S, retry=retry, cooldown_s=0.5, http_transport=transport
        ) as client:
            steady = asyncio.Event()

            async def worker(w: int) -> list[Any]:
                replies = []
                for n in range(3):
                    images = [_unique_picture(c, 10_000 + 100 * w + 10 * n + k) for k, c in enumerate(("red", "blue"))]
                    replies.append(await client.score_generation_group("a red square", images))
                    steady.set()
                return replies

            killing = _kill_a_busy_replica(app, steady)
            (victim, ongoing), *results = await asyncio.gather(killing, *map(worker, range(4)))
        return [reply for replies in results for reply in replies], victim, ongoing

    return asyncio.run(load())


def _assert_all_scored(replies: list[Any]) -> None:
    assert len(replies) == 12
    assert [reply.errors() for reply in replies] == [[]] * 12
    assert all(all(reply.mask()) and reply.group.scored == 2 for reply in replies)


def test_killed_replica_is_replaced_and_the_client_retries_its_requests(sim_urls: dict[str, str]) -> None:
    app = "firm-kill"
    url = _sim_url(sim_urls, app)
    before = _critic_actors(app)
    assert len(before) == 2
    transport = _RecordingTransport()
    replies, victim, ongoing = _score_while_killing(url, app, transport)
    _assert_all_scored(replies)
    assert ongoing >= 1
    assert (503, "replica_lost") in transport.answers, "the kill caught no request, so nothing was retried"

    deadline = time.monotonic() + WAIT_S
    while not (victim not in (now := _critic_actors(app)) and len(now) == 2 and _running(app, "FirmCritic") == 2):
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}"
        time.sleep(0.2)
    (replacement,) = set(now) - set(before)
    seen: set[str] = set()
    for round_ in range(10):  # the replacement takes its share of requests
        body = {"items": [{"image": _unique("orange", 50_000 + round_), "prompt": "an orange square"}]}
        seen.update(r.split("#")[1] for r in asyncio.run(_replicas_answering(url, "/v1/gen/score", body, 8)))
        if replacement in seen:
            break
    assert replacement in seen and victim not in seen
    assert httpx.get(f"{url}/readyz").json()["ready"] is True


def test_ingress_resends_the_requests_of_a_killed_replica(sim_urls: dict[str, str]) -> None:
    assert "forward_attempts" not in SIM_APPS["firm-resend"] and RaySettings().forward_attempts == 2
    transport = _RecordingTransport()
    replies, _, ongoing = _score_while_killing(_sim_url(sim_urls, "firm-resend"), "firm-resend", transport)
    _assert_all_scored(replies)
    assert ongoing >= 1, "the kill caught no request"
    assert transport.answers == [(200, None)] * len(replies), "no 503 reaches the client: the ingress sent them on"


def test_overload_is_refused_with_429_and_retry_after(sim_urls: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="max_queued_requests"):
        RaySettings(max_queued_requests=0)  # Ray takes -1 (no bound) or a positive bound
    url = _sim_url(sim_urls, "firm-limited")  # one replica taking one request at a time, one more waiting
    body = {"items": [{"source": b64("red"), "edited": b64("blue"), "instruction": "Make the square blue."}]}
    key = {"Authorization": f"Bearer {KEY}"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S, headers=key) as http:
            return await asyncio.gather(*(http.post("/v1/edit/score", json=body) for _ in range(6)))

    answers = asyncio.run(burst())
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "overloaded"
    assert float(refused.headers["retry-after"]) > 0
