"""The Ray Serve application's parts without a cluster: shipped configs, health checks, API-key
requirement, the metrics board's logging, and the ingress app over stand-in critic deployments
(body handling, readiness of split critics, refusals from the critics and from Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from ray.exceptions import RayActorError  # noqa: E402
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError  # noqa: E402

from clients.protocol import GenScoreRequest, GenScoreResponse  # noqa: E402
from clients.tasks import TASKS  # noqa: E402
from deploy.ray.app import build  # noqa: E402
from deploy.ray.calls import Call, Outcome, Refusal  # noqa: E402
from deploy.ray.critic import CriticUnhealthy, FirmCritic  # noqa: E402
from deploy.ray.metrics import share_metrics  # noqa: E402
from deploy.ray.router import CriticPool, ingress_app  # noqa: E402
from deploy.ray.settings import MissingApiKeys, served_settings  # noqa: E402
from server.errors import NotReady  # noqa: E402
from server.images import ImageTooLarge  # noqa: E402
from server.lifecycle import ModelState  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.security import is_loopback  # noqa: E402
from server.settings import Settings  # noqa: E402

LOADING, READY, FAILED, DISABLED = ModelState.LOADING, ModelState.READY, ModelState.FAILED, ModelState.DISABLED
SLEEPING, UNHEALTHY, DRAINING = ModelState.SLEEPING, ModelState.UNHEALTHY, ModelState.DRAINING

RAY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ray"


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

    # KubeRay binds Serve's proxy on every interface of each pod; the config files say where theirs listen.
    exposed = name == "rayservice.yaml" or not is_loopback(config.get("http_options", {}).get("host", "127.0.0.1"))
    if config.get("proxy_location", "EveryNode") == "EveryNode" and name != "rayservice.yaml":
        assert exposed, f"{name}: a proxy on every node serves other machines only on a non-loopback host"
    if exposed:
        assert all(a.get("args", {}).get("require_api_keys") for a in config["applications"]), name


def test_the_ingress_refuses_to_start_without_required_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRM_API_KEYS", raising=False)
    monkeypatch.delenv("FIRM_API_KEY_FILE", raising=False)
    server = {"tiny": True}
    assert served_settings(server, require_api_keys=False).key_ring().enabled is False
    with pytest.raises(MissingApiKeys):
        served_settings(server, require_api_keys=True)
    keyed = served_settings({**server, "api_keys": "trainer:0123456789abcdef"}, require_api_keys=True)
    assert keyed.key_ring().enabled


class _FakeService:
    """A scoring service whose critics go through the given states, one per call."""

    def __init__(self, *states: dict[str, str]) -> None:
        self.sequence = list(states)

    def states(self) -> dict[str, str]:
        return self.sequence.pop(0) if len(self.sequence) > 1 else self.sequence[0]


class _BareCritic(FirmCritic.func_or_class):  # type: ignore[name-defined,misc]
    """The replica class built without Ray: tests set the attributes a method reads."""

    def __del__(self) -> None:  # Ray awaits the replica's async __del__; nothing would await it here
        pass


def _bare_critic(service: _FakeService) -> Any:
    """A replica with only what `check_health` and `_loaded` read."""
    critic = object.__new__(_BareCritic)
    critic.identity, critic.service = "FirmCritic#test", service
    critic.closed = False
    critic._lifespan = contextlib.AsyncExitStack()
    critic._lifespan.callback(lambda: setattr(critic, "closed", True))
    return critic


@pytest.mark.parametrize("state", [READY, DISABLED, SLEEPING, DRAINING])
def test_health_check_passes_for_working_states(state: str) -> None:
    asyncio.run(_bare_critic(_FakeService({"edit": state, "gen": READY})).check_health())


@pytest.mark.parametrize("state", [UNHEALTHY, FAILED, LOADING])
def test_health_check_fails_an_unhealthy_replica(state: str) -> None:
    with pytest.raises(CriticUnhealthy, match=state):
        asyncio.run(_bare_critic(_FakeService({"edit": READY, "gen": state})).check_health())


def test_replica_starts_only_once_every_critic_has_loaded() -> None:
    loading = {"edit": LOADING, "gen": LOADING}
    critic = _bare_critic(_FakeService(loading, {"edit": READY, "gen": LOADING}, {"edit": READY, "gen": DISABLED}))
    asyncio.run(critic._loaded())
    assert critic.service.sequence == [{"edit": READY, "gen": DISABLED}] and not critic.closed


def test_a_critic_that_failed_to_load_fails_its_replica() -> None:
    critic = _bare_critic(_FakeService({"edit": LOADING, "gen": READY}, {"edit": FAILED, "gen": READY}))
    with pytest.raises(CriticUnhealthy, match="did not load"):
        asyncio.run(critic._loaded())
    assert critic.closed, "the engines that did load are closed before the replica fails"


class _FlakyBoard:
    """A metrics board whose pushes fail or succeed as scripted; it stops the pusher when the script ends."""

    def __init__(self, script: list[bool]) -> None:
        self.script, self.done = script, asyncio.Event()
        self.push = self

    async def remote(self, replica: str, page: str) -> None:
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        if not self.script.pop(0):
            raise ConnectionError("board is restarting")


def test_board_outage_logs_one_traceback_then_one_line_per_push(caplog: pytest.LogCaptureFixture) -> None:
    board = _FlakyBoard([False, False, False, True, False, False])

    async def run() -> None:
        pushing = asyncio.create_task(share_metrics(board, "FirmCritic#test", CollectorRegistry(), 0.0))  # type: ignore[arg-type]
        await asyncio.wait_for(board.done.wait(), timeout=10)
        pushing.cancel()
        await asyncio.gather(pushing, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="deploy.ray.metrics"):
        asyncio.run(run())
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 5
    assert [r.exc_info is not None for r in failures] == [True, False, False, True, False]
    assert sum("again" in r.getMessage() for r in caplog.records) == 1


class _Method:
    """One method of a stand-in deployment handle: `remote` records the call and answers from `answer`."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.calls = answer, []

    async def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        answer = self.answer(*args) if callable(self.answer) else self.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer


class _Deployment:
    """A stand-in critic deployment handle: its replicas' states, cards and scoring outcome."""

    def __init__(self, name: str, states: dict[str, str], score: Any = None) -> None:
        self.deployment_name = name
        self.states, self.cards, self.score = _Method(states), _Method([]), _Method(score)
        self.failures = _Method({})


def _ingress(*deployments: _Deployment, settings: Settings | None = None) -> FastAPI:
    """The ingress app over stand-in critics: each task served by the deployment whose states enable it."""
    critics = {
        task: next((d for d in deployments if d.states.answer[task] != DISABLED), deployments[0]) for task in TASKS
    }

    async def page() -> bytes:
        return b""

    return ingress_app(CriticPool(critics, attempts=2), settings or Settings(tiny=True), Metrics(), page)  # type: ignore[arg-type]


def _get(app: FastAPI, path: str, root_path: str = "", **kwargs: Any) -> httpx.Response:
    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            return await http.request("POST" if "json" in kwargs else "GET", path, **kwargs)

    return asyncio.run(ask())


GEN_BODY = {"items": [{"image": "eA==", "prompt": "a red square"}]}


def test_the_ingress_scores_nothing_when_the_client_leaves_during_the_upload() -> None:
    critic = _Deployment("FirmCritic", {"edit": READY, "gen": READY})
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/gen/score",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "query_string": b"",
    }
    # a whole, scorable body whose upload the client leaves before saying it is done: scoring it would be wrong
    body = json.dumps(GEN_BODY).encode()
    messages = [{"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(_ingress(critic)(scope, receive, send))
    assert critic.score.calls == []


def test_readiness_of_split_critics_comes_from_each_tasks_deployment() -> None:
    edit = _Deployment("FirmEditCritic", {"edit": READY, "gen": DISABLED})
    gen = _Deployment("FirmGenCritic", {"edit": DISABLED, "gen": LOADING})
    response = _get(_ingress(edit, gen), "/readyz")
    assert (response.status_code, response.json()) == (
        503,
        {"ready": False, "models": {"edit": "ready", "gen": "loading"}},
    )
    gen.states.answer = {"edit": DISABLED, "gen": READY}
    assert _get(_ingress(edit, gen), "/readyz").json() == {"ready": True, "models": {"edit": "ready", "gen": "ready"}}
    # a deployment whose critic failed to load says why, through the ingress
    gen.states.answer, gen.failures.answer = {"edit": DISABLED, "gen": "failed"}, {"gen": "org/gen cannot be had"}
    failed = _get(_ingress(edit, gen), "/readyz").json()
    assert failed["models"]["gen"] == "failed" and failed["failures"] == {"gen": "org/gen cannot be had"}


def test_a_critics_answer_and_refusals_are_answered_as_firm_serve_does() -> None:
    answer = GenScoreResponse.model_validate(
        {"model": {"name": "tiny"}, "score_mode": "argmax", "weights": {"w1": 0.4, "w2": 0.6}, "results": []}
    )
    critic = _Deployment("FirmCritic", {"edit": READY, "gen": READY}, Outcome("FirmCritic#a", response=answer))
    scored = _get(_ingress(critic), "/v1/gen/score", json=GEN_BODY, headers={"X-Request-ID": "parts-1"})
    assert scored.status_code == 200 and scored.headers["x-firm-replica"] == "FirmCritic#a"
    (call,) = critic.score.calls[0]
    assert isinstance(call, Call) and isinstance(call.request, GenScoreRequest) and call.request_id == "parts-1"

    for error, status, code in (
        (NotReady("the gen model is sleeping", retry_after=30), 503, "not_ready"),
        (ImageTooLarge("items[0].image", "48000000 pixels", 40_000_000), 413, "image_too_large"),
    ):
        critic.score.answer = Outcome("FirmCritic#b", refusal=Refusal.of(error))
        refused = _get(_ingress(critic), "/v1/gen/score", json=GEN_BODY)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
        assert refused.json()["error"]["message"] == str(error) and refused.headers["x-firm-replica"] == "FirmCritic#b"
    assert refused.json()["error"]["limit"] == 40_000_000


def test_under_a_route_prefix_the_ingress_sees_the_paths_firm_serve_sees() -> None:
    critic = _Deployment("FirmCritic", {"edit": READY, "gen": READY})
    keyed = _ingress(critic, settings=Settings(tiny=True, api_keys="contract:0123456789abcdef"))
    assert _get(keyed, "/firm/readyz", root_path="/firm").status_code == 200, "readiness needs no key"
    assert _get(keyed, "/firm/v1/models", root_path="/firm").status_code == 401
    assert _get(keyed, "/firm/v1/gen/score", root_path="/firm", json=GEN_BODY).status_code == 401


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (RayActorError(), 503, "replica_lost"),  # on every attempt
        (BackPressureError(num_queued_requests=1, max_queued_requests=1), 429, "overloaded"),
        (DeploymentUnavailableError("FirmCritic"), 503, "not_ready"),  # type: ignore[arg-type]
    ],
)
def test_ray_failures_are_refused_with_retry_after(failure: Exception, status: int, code: str) -> None:
    critic = _Deployment("FirmCritic", {"edit": READY, "gen": READY}, failure)
    refused = _get(_ingress(critic), "/v1/gen/score", json=GEN_BODY)
    assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
    assert int(refused.headers["retry-after"]) >= 1
    assert len(critic.score.calls) == (2 if code == "replica_lost" else 1), "only a lost replica's call is sent again"


def test_settings_reach_the_critic_deployments() -> None:
    """Resources, autoscaling and the split are what Ray is asked for (read back from the bound application)."""
    app = build(
        {
            "split": True,
            "num_gpus": 1,
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 24,
            "upscale_delay_s": 3,
            "downscale_delay_s": 120,
            "server": {"tiny": True},
        }
    )
    ingress = app._bound_deployment
    assert ingress.name == "FirmIngress"
    critics = {task: bound._bound_deployment for task, bound in ingress.init_args[0].items()}
    assert {task: d.name for task, d in critics.items()} == {"edit": "FirmEditCritic", "gen": "FirmGenCritic"}
    for deployment in critics.values():
        assert deployment.ray_actor_options["num_gpus"] == 1
        scaling = deployment._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 24)
        assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (3, 120)


def test_replicas_keep_no_recent_items_ring_unless_asked_for() -> None:
    """The ingress serves no watch page, so a replica's thumbnails would be work no one can see."""
    from deploy.ray.settings import RaySettings

    assert RaySettings(server={"tiny": True}).critic_settings().watch_samples == 0
    assert RaySettings(server={"tiny": True, "watch_samples": 8}).critic_settings("edit").watch_samples == 8
