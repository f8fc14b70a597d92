"""The Ray Serve application on a local Ray cluster: two replicas of the tiny critic.

What a user scaling out relies on: requests spread over the replicas (each answer names its
replica), every route answers exactly as a plain `firm-serve` does, each replica's metrics are
visible with its identity, split critics are routed by path, and a replica killed under load
is replaced while the client's retries lose no request.
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
import yaml
from PIL import Image

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from clients import AsyncRewardClient  # noqa: E402
from clients.images import encode  # noqa: E402
from clients.retry import RetryPolicy  # noqa: E402
from deploy.ray.app import build, build_app  # noqa: E402
from deploy.ray.settings import RaySettings  # noqa: E402
from tests.support import b64, free_port, metric_value, picture  # noqa: E402

RAY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ray"
APP, SPLIT_APP = "firm", "firm-split"
REPLICA_HEADER = "x-firm-replica"
WAIT_S = 120.0  # most any cluster change may take before the test gives up


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
def ray_url(ray_cluster: int, tiny_checkpoint: Path, cache_dir: Path) -> str:
    """Both critics in each of two replicas, behind the path-routing ingress."""
    settings = RaySettings(
        server=_server_settings(cache_dir),
        num_gpus=0,
        num_cpus=1,
        min_replicas=2,
        max_replicas=2,
        health_check_period_s=1,
        metrics_push_interval_s=1,
        forward_attempts=1,  # a request caught by a dying replica comes back 503: the client's retries take over
    )
    serve.run(build_app(settings), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{ray_cluster}"


def _unique_picture(colour: str, serial: int) -> Image.Image:
    """A square of `colour` with one pixel set from `serial`: no judge call repeats, so no cache answers."""
    image = picture(colour)
    image.putpixel((0, 0), (serial % 256, serial // 256 % 256, 7))
    return image


def _unique(colour: str, serial: int) -> str:
    return encode(_unique_picture(colour, serial))


BODIES: dict[str, dict[str, Any]] = {
    "/v1/edit/score": {
        "items": [
            {"id": "done", "source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."},
            {"id": "unchanged", "source": b64("blue"), "edited": b64("blue"), "instruction": "Make the square red."},
            {"id": "broken", "source": b64("blue"), "edited": "bm90IGFuIGltYWdl", "instruction": "Paint it red."},
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


def _critic_actors(deployment: str = "FirmCritic") -> dict[str, str]:
    """Replica id -> actor name of the live replicas of `deployment` (Ray names replica actors)."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
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


def test_status_and_errors_answer_as_the_plain_server(ray_url: str, server_url: str) -> None:
    for path in ("/readyz", "/healthz", "/v1/models"):
        plain, scaled = httpx.get(f"{server_url}{path}"), httpx.get(f"{ray_url}{path}")
        assert (scaled.status_code, scaled.json()) == (plain.status_code, plain.json()), path
    bad = {"items": [{"image": b64("red")}]}  # no prompt
    plain, scaled = httpx.post(f"{server_url}/v1/gen/score", json=bad), httpx.post(f"{ray_url}/v1/gen/score", json=bad)
    assert scaled.status_code == plain.status_code == 422
    assert scaled.json()["error"]["code"] == plain.json()["error"]["code"]


def test_metrics_show_every_replica_with_its_identity(ray_url: str) -> None:
    replicas = set(_critic_actors())
    assert {name.split("#")[1] for name in _both_replicas_answer(ray_url, serial=1000)} == replicas
    deadline = time.monotonic() + WAIT_S
    while True:  # each replica shares its series every second
        page = httpx.get(f"{ray_url}/metrics").text
        labelled = {r for r in replicas if metric_value(page, "firm_requests_total", replica=r) > 0}
        if labelled == replicas or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert labelled == replicas
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


def test_killed_replica_is_replaced_and_no_request_is_lost(ray_url: str) -> None:
    before = _critic_actors()
    assert len(before) == 2
    victim_id, victim = sorted(before.items())[0]

    async def load() -> list[Any]:
        retry = RetryPolicy(max_attempts=8, backoff_s=0.25, max_backoff_s=2.0)
        async with AsyncRewardClient(ray_url, timeout_s=WAIT_S, retry=retry, cooldown_s=1.0) as client:
            done = asyncio.Event()

            async def worker(w: int) -> list[Any]:
                replies = []
                for n in range(6):
                    images = [_unique_picture(c, 10_000 + 100 * w + 10 * n + k) for k, c in enumerate(("red", "blue"))]
                    replies.append(await client.score_generation_group("a red square", images))
                    done.set()
                return replies

            async def kill_when_busy() -> None:
                await done.wait()  # the load is under way: requests are in flight on both replicas
                await asyncio.to_thread(ray.kill, ray.get_actor(victim, namespace="serve"), no_restart=True)

            results = await asyncio.gather(kill_when_busy(), *(worker(w) for w in range(4)))
            return [reply for replies in results[1:] for reply in replies]

    replies = asyncio.run(load())
    assert len(replies) == 24
    assert [reply.errors() for reply in replies] == [[]] * 24
    assert all(all(reply.mask()) and reply.group.scored == 2 for reply in replies)

    deadline = time.monotonic() + WAIT_S
    while not (victim_id not in (now := _critic_actors()) and len(now) == 2 and _running(APP, "FirmCritic") == 2):
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}"
        time.sleep(0.5)
    (replacement,) = set(now) - set(before)
    seen: set[str] = set()
    for round_ in range(10):  # the replacement takes its share of requests
        body = {"items": [{"image": _unique("orange", 50_000 + round_), "prompt": "an orange square"}]}
        seen.update(r.split("#")[1] for r in asyncio.run(_replicas_answering(ray_url, "/v1/gen/score", body, 8)))
        if replacement in seen:
            break
    assert replacement in seen and victim_id not in seen
    assert json.loads(httpx.get(f"{ray_url}/readyz").text)["ready"] is True


def _serve_configs() -> list[tuple[str, dict[str, Any]]]:
    """Every Serve config we ship: the config files and the RayService's embedded one."""
    configs = [(path.name, yaml.safe_load(path.read_text())) for path in sorted(RAY_DIR.glob("serve_config*.yaml"))]
    service = yaml.safe_load((RAY_DIR / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    configs.append(("rayservice.yaml", yaml.safe_load(service["spec"]["serveConfigV2"])))
    return configs


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_shipped_serve_configs_deploy_this_application(name: str, config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay check first
    for application in config["applications"]:
        assert application["import_path"] == "deploy.ray.app:build", name
        build(application.get("args", {}))  # every argument is a valid setting, the server's included
