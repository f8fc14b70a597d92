"""A critic replica: the `firm-serve` FastAPI app, its weights loaded, inside a Ray Serve replica.

The replica builds the app from the same settings as `firm-serve`, runs its lifespan (which
loads the weights) and reports ready to Ray only once every critic it serves is loaded, so no
request reaches a replica that would answer 503. Where the Serve proxy listens beyond loopback,
`require_api_keys` makes a replica without API keys refuse to start instead of scoring for
anyone. Ray's health check asks the scoring service: a failed load or an engine that keeps
failing makes the check fail, and Ray replaces the replica.
Every answer names the replica in `X-FIRM-Replica`; its metrics carry `deployment` and `replica`
labels and are pushed to the metrics board, which `/metrics` through the ingress reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from prometheus_client import generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.ray.forwarding import REPLICA_HEADER, Answer, Forwarded, play
from deploy.ray.metrics import labelled_registry
from server.app import create_app
from server.scoring import DISABLED, DRAINING, LOADING, READY, SLEEPING
from server.settings import Settings

log = logging.getLogger(__name__)

HEALTHY = (READY, DISABLED, SLEEPING, DRAINING)


class CriticUnhealthy(RuntimeError):
    """A critic failed to load or its engine keeps failing; Ray replaces the replica."""


class MissingApiKeys(RuntimeError):
    """API keys are required (the proxy is reachable from the network) but the replica has none."""


def replica_settings(server: dict[str, Any], require_api_keys: bool) -> Settings:
    """The replica's `firm-serve` settings, checked before any weights load.

    Ray's proxy, not the replica, binds the address, so the server's own "no keys on a public
    address" check never runs here; `require_api_keys` stands in for it.
    """
    settings = Settings(**server)
    if require_api_keys and not settings.key_ring().enabled:
        raise MissingApiKeys(
            "require_api_keys is set but this replica has no API keys: set FIRM_API_KEYS on every node "
            "(or in the application's runtime_env), or api_key_file under server"
        )
    return settings


@serve.deployment
class FirmCritic:
    """One replica of one or both critics (as `Settings` says), answering forwarded HTTP requests."""

    async def __init__(
        self,
        server: dict[str, Any],
        board: DeploymentHandle | None = None,
        push_interval_s: float = 5.0,
        require_api_keys: bool = False,
    ) -> None:
        context = serve.get_replica_context()
        self.identity = f"{context.deployment}#{context.replica_tag}"
        self.app = create_app(replica_settings(server, require_api_keys))
        self.service = self.app.state.service
        labels = {"deployment": context.deployment, "replica": context.replica_tag}
        metrics = self.app.state.metrics
        metrics.registry = labelled_registry(metrics.registry, labels)  # the app's /metrics names the replica
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        await self._loaded()
        self.board, self.push_interval_s = board, push_interval_s
        self._pushing = asyncio.create_task(self._share_metrics(), name="share-metrics") if board else None
        log.info("replica %s ready: %s", self.identity, self.service.states())

    async def _loaded(self) -> None:
        """Wait for the lifespan's background load; a critic that failed to load fails the replica."""
        while LOADING in (states := self.service.states()).values():
            await asyncio.sleep(0.1)
        if any(state not in HEALTHY for state in states.values()):
            await self._lifespan.aclose()
            raise CriticUnhealthy(f"critics did not load: {states}")

    async def forward(self, request: Forwarded) -> Answer:
        """Answer one HTTP request exactly as `firm-serve` would, naming this replica."""
        answer = await play(self.app, request)
        answer.headers.append((REPLICA_HEADER, self.identity.encode("latin-1")))
        return answer

    async def check_health(self) -> None:
        """Ray's health check: every critic loaded and its engine healthy (asleep counts as healthy)."""
        states = self.service.states()
        if any(state not in HEALTHY for state in states.values()):
            raise CriticUnhealthy(f"replica {self.identity} is unhealthy: {states}")

    async def _share_metrics(self) -> None:
        """Push this replica's page every interval; the board being down (restarting) must not stop scoring.

        The first failed push is logged with its traceback, the following ones in one line each, so
        an outage of minutes does not fill the log with the same traceback every few seconds.
        """
        assert self.board is not None
        failing = False
        while True:
            try:
                page = generate_latest(self.app.state.metrics.registry).decode("utf-8")
                await self.board.push.remote(self.identity, page)
            except Exception as exc:  # logged; the next push retries
                if failing:
                    log.warning("still cannot share metrics with the board: %s: %s", type(exc).__name__, exc)
                else:
                    log.warning("could not share metrics with the board; retrying", exc_info=True)
                failing = True
            else:
                if failing:
                    log.info("sharing metrics with the board again")
                failing = False
            await asyncio.sleep(self.push_interval_s)

    async def __del__(self) -> None:
        """Ray stops the replica: stop sharing metrics (the board forgets it soon), close the engines."""
        pushing = getattr(self, "_pushing", None)
        if pushing is not None:
            pushing.cancel()
            await asyncio.gather(pushing, return_exceptions=True)
        if hasattr(self, "_lifespan"):
            await self._lifespan.aclose()
