"""A critic replica: the `firm-serve` FastAPI app, its weights loaded, inside a Ray Serve replica.

The replica builds the app from the same settings as `firm-serve`, runs its lifespan (which
loads the weights) and reports ready to Ray only once every critic it serves is loaded, so no
request reaches a replica that would answer 503. Ray's health check asks the scoring service:
a failed load or an engine that keeps failing makes the check fail, and Ray replaces the replica.
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

from deploy.ray.forwarding import Answer, Forwarded, play
from deploy.ray.metrics import labelled_registry
from server.app import create_app
from server.scoring import DISABLED, DRAINING, LOADING, READY, SLEEPING
from server.settings import Settings

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-firm-replica"
HEALTHY = (READY, DISABLED, SLEEPING, DRAINING)


class CriticUnhealthy(RuntimeError):
    """A critic failed to load or its engine keeps failing; Ray replaces the replica."""


@serve.deployment
class FirmCritic:
    """One replica of one or both critics (as `Settings` says), answering forwarded HTTP requests."""

    async def __init__(
        self, server: dict[str, Any], board: DeploymentHandle | None = None, push_interval_s: float = 5.0
    ) -> None:
        context = serve.get_replica_context()
        self.identity = f"{context.deployment}#{context.replica_tag}"
        self.app = create_app(Settings(**server))
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
        assert self.board is not None
        while True:
            try:
                page = generate_latest(self.app.state.metrics.registry).decode("utf-8")
                await self.board.push.remote(self.identity, page)
            except Exception:  # the board restarting must not stop scoring; the next push retries
                log.warning("could not share metrics with the board; retrying", exc_info=True)
            await asyncio.sleep(self.push_interval_s)

    async def __del__(self) -> None:
        """Ray stops the replica: stop sharing metrics (the board forgets it soon), close the engines."""
        pushing = getattr(self, "_pushing", None)
        if pushing is not None:
            pushing.cancel()
            await asyncio.gather(pushing, return_exceptions=True)
        if hasattr(self, "_lifespan"):
            await self._lifespan.aclose()
