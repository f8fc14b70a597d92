"""A critic replica: `firm-serve`'s scoring service, its weights loaded, inside a Ray Serve replica.

The replica builds the scoring service from the same settings as `firm-serve`, loads it the way
`firm-serve`'s lifespan does, and reports ready to Ray only once every critic it serves is
loaded, so no call reaches a replica that would refuse it as not ready. It answers the calls the
ingress parsed (`deploy.ray.calls`); HTTP, keys and limits are the ingress's. Ray's health check
asks the scoring service: a failed load or an engine that keeps failing makes the check fail,
and Ray replaces the replica. Every outcome names the replica; its metrics carry `deployment`
and `replica` labels and are pushed to the metrics board, which `/metrics` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from clients.protocol import ModelCard
from deploy.ray.calls import REFUSALS, Call, Outcome, Refusal
from deploy.ray.metrics import labelled_registry, share_metrics
from server.app import service_lifespan
from server.assembly import build_service
from server.lifecycle import ModelState
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

# a degraded critic (canary drift) still scores: restarting it would only record a new reference
HEALTHY = (ModelState.READY, ModelState.DISABLED, ModelState.SLEEPING, ModelState.DRAINING, ModelState.DEGRADED)


class CriticUnhealthy(RuntimeError):
    """A critic failed to load or its engine keeps failing; Ray replaces the replica."""


@serve.deployment
class FirmCritic:
    """One replica of one or both critics (as `Settings` says), scoring the calls the ingress forwards."""

    async def __init__(
        self, server: dict[str, Any], board: DeploymentHandle | None = None, push_interval_s: float = 5.0
    ) -> None:
        context = serve.get_replica_context()
        self.identity = f"{context.deployment}#{context.replica_tag}"
        metrics = Metrics()
        self.service = build_service(Settings(**server), metrics)
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(service_lifespan(self.service))
        await self._loaded()
        labels = {"deployment": context.deployment, "replica": context.replica_tag}
        registry = labelled_registry(metrics.registry, labels)
        pushing = share_metrics(board, self.identity, registry, push_interval_s) if board else None
        self._pushing = asyncio.create_task(pushing, name="share-metrics") if pushing else None
        log.info("replica %s ready: %s", self.identity, self.service.states())

    async def _loaded(self) -> None:
        """Wait for the background load; a critic that failed to load fails the replica."""
        while ModelState.LOADING in (states := self.service.states()).values():
            await asyncio.sleep(0.1)
        if any(state not in HEALTHY for state in states.values()):
            await self._lifespan.aclose()
            raise CriticUnhealthy(f"critics did not load: {states}")

    async def score(self, call: Call) -> Outcome:
        """Score one parsed request as `firm-serve` would, its log lines carrying the request's id and key."""
        with call.context():
            try:
                return Outcome(self.identity, response=await self.service.score(call.request))
            except REFUSALS as exc:
                return Outcome(self.identity, refusal=Refusal.of(exc))

    async def states(self) -> dict[str, str]:
        """The state of every task's model here, switched-off ones included."""
        return {task: str(state) for task, state in self.service.states().items()}

    async def failures(self) -> dict[str, str]:
        """Why each failed model here failed."""
        return self.service.failures()

    async def cards(self) -> list[ModelCard]:
        """The critics this replica serves."""
        return self.service.cards()

    async def check_health(self) -> None:
        """Ray's health check: every critic loaded and its engine healthy (asleep counts as healthy)."""
        states = self.service.states()
        if any(state not in HEALTHY for state in states.values()):
            raise CriticUnhealthy(f"replica {self.identity} is unhealthy: {states}")

    async def __del__(self) -> None:
        """Ray stops the replica: stop sharing metrics (the board forgets it soon), close the engines."""
        pushing = getattr(self, "_pushing", None)
        if pushing is not None:
            pushing.cancel()
            await asyncio.gather(pushing, return_exceptions=True)
        if hasattr(self, "_lifespan"):
            await self._lifespan.aclose()
