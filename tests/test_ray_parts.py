"""The Ray Serve application's parts without a cluster: shipped configs, health checks, API-key
requirement, the metrics board's logging and the ingress's body handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
from prometheus_client import CollectorRegistry  # noqa: E402

from deploy.ray.app import build  # noqa: E402
from deploy.ray.critic import CriticUnhealthy, FirmCritic, MissingApiKeys, replica_settings  # noqa: E402
from deploy.ray.forwarding import Answer, Forwarded  # noqa: E402
from deploy.ray.router import PathRouter  # noqa: E402
from server.scoring import DISABLED, DRAINING, FAILED, LOADING, READY, SLEEPING, UNHEALTHY  # noqa: E402
from server.security import is_loopback  # noqa: E402

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


def test_replicas_refuse_to_start_without_required_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRM_API_KEYS", raising=False)
    monkeypatch.delenv("FIRM_API_KEY_FILE", raising=False)
    server = {"tiny": True}
    assert replica_settings(server, require_api_keys=False).key_ring().enabled is False
    with pytest.raises(MissingApiKeys):
        replica_settings(server, require_api_keys=True)
    keyed = replica_settings({**server, "api_keys": "trainer:0123456789abcdef"}, require_api_keys=True)
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
    critic = object.__new__(_BareCritic)
    critic.identity, critic.push_interval_s = "FirmCritic#test", 0.0
    critic.app = SimpleNamespace(state=SimpleNamespace(metrics=SimpleNamespace(registry=CollectorRegistry())))
    critic.board = _FlakyBoard([False, False, False, True, False, False])

    async def run() -> None:
        pushing = asyncio.create_task(critic._share_metrics())
        await asyncio.wait_for(critic.board.done.wait(), timeout=10)
        pushing.cancel()
        await asyncio.gather(pushing, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="deploy.ray.critic"):
        asyncio.run(run())
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 5
    assert [r.exc_info is not None for r in failures] == [True, False, False, True, False]
    assert sum("again" in r.getMessage() for r in caplog.records) == 1


class _FakeHandle:
    """A deployment handle that records what it is asked to forward."""

    deployment_name = "FirmCritic"

    def __init__(self) -> None:
        self.forwarded: list[Forwarded] = []
        self.forward = self

    async def remote(self, request: Forwarded) -> Answer:
        self.forwarded.append(request)
        return Answer(200, [], b"{}")


def test_ingress_forwards_nothing_when_the_client_leaves_during_the_upload() -> None:
    critic = _FakeHandle()
    router = PathRouter({"edit": critic, "gen": critic}, board=_FakeHandle(), max_body_bytes=1 << 20, attempts=2)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "POST", "path": "/v1/gen/score", "headers": [], "client": ("127.0.0.1", 1)}
    messages = [{"type": "http.request", "body": b'{"items": [', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(router(scope, receive, send))
    assert critic.forwarded == [] and sent == []


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
