"""The HTTP ingress of the Ray application: `firm-serve`'s own app over the critic deployments.

The ingress serves the server's app (`server.app.serving_app`): the same middleware (request
ids, metrics, keys, body limit), the same route table and the same error mapping, so every
route answers as `firm-serve` does. Only the scoring service behind the routes differs: a
`CriticPool`, which sends each scoring request to the deployment serving its task (the same
deployment for every task unless the critics are split) and gathers `/readyz` and `/v1/models`
from every deployment. `/metrics` answers with the metrics board's pages (each replica's as of
its last push). The admin routes answer 404: replicas scale instead of sleeping.

A critic replica that dies under a request is the one failure the ingress absorbs: scoring is
idempotent, so the request is sent again (another replica takes it) and, when the attempts run
out, answered 503 with Retry-After, which clients retry. Ray's own answer would be a 500, which
means a bug and is never retried. When `max_queued_requests` requests already wait for a free
critic replica, the next is answered 429 with Retry-After rather than queued without end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.protocol import ModelCard, ScoringRequest, ScoringResponse
from deploy.ray.calls import REPLICA_HEADER, Call, Outcome
from deploy.ray.metrics import labelled_registry, share_metrics
from deploy.ray.settings import served_settings
from server.app import serving_app
from server.errors import NotReady, Overloaded, ServiceError
from server.metrics import Metrics
from server.routes import MetricsPage
from server.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
_NO_ADMIN = "admin routes are not served through Ray Serve: replicas scale instead of sleeping"
_answered_by: ContextVar[list[str] | None] = ContextVar("answered_by", default=None)


class ReplicaLost(ServiceError):
    """Critic replicas died under every attempt at a call; a retry finds their replacements."""

    status, code = 503, "replica_lost"


class NotServed(ServiceError):
    """A route of the API the Ray application does not serve."""

    status, code = 404, "not_found"


class CriticPool:
    """The scoring service as the ingress sees it: the service's API over the critic deployments."""

    def __init__(self, critics: Mapping[str, DeploymentHandle], attempts: int) -> None:
        self.critics, self.attempts = critics, attempts
        by_name = {handle.deployment_name: handle for handle in critics.values()}
        self.deployments = list(by_name.values())  # each distinct deployment once, in task order

    async def score(self, request: ScoringRequest) -> ScoringResponse:
        """Score on the deployment serving the request's task; the replica that did is named in the answer."""
        outcome: Outcome = await self._ask(self.critics[request.task], "score", Call.here(request))
        if (named := _answered_by.get()) is not None:
            named.append(outcome.replica)
        return outcome.result()

    async def states(self) -> dict[str, str]:
        """Each task's state, from the deployment that serves it."""
        answers = await asyncio.gather(*(self._ask(deployment, "states") for deployment in self.deployments))
        by_name = {
            deployment.deployment_name: states for deployment, states in zip(self.deployments, answers, strict=True)
        }
        return {task: by_name[handle.deployment_name][task] for task, handle in self.critics.items()}

    async def failures(self) -> dict[str, str]:
        """Why each failed task's model failed, from the deployment that serves it."""
        answers = await asyncio.gather(*(self._ask(deployment, "failures") for deployment in self.deployments))
        return {task: why for failures in answers for task, why in failures.items() if task in self.critics}

    async def cards(self) -> list[ModelCard]:
        """The critics of every deployment."""
        answers = await asyncio.gather(*(self._ask(deployment, "cards") for deployment in self.deployments))
        return [card for cards in answers for card in cards]

    def overloaded(self, task: str, calls: int = 1) -> ServiceError | None:
        """Never before a body is read: each replica admits its own calls, and Ray bounds the wait before them."""
        return None

    async def sleep(self) -> dict[str, str]:
        raise NotServed(_NO_ADMIN)

    async def wake(self) -> dict[str, str]:
        raise NotServed(_NO_ADMIN)

    async def _ask(self, deployment: DeploymentHandle, method: str, *args: Any) -> Any:
        """`method` of a replica of `deployment`, sent again if the replica dies under it."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await getattr(deployment, method).remote(*args)
            except RayActorError as exc:
                log.warning("a critic replica died under %s (attempt %d): %s", method, attempt, exc)
            except BackPressureError as exc:
                raise Overloaded(f"every critic replica is busy: {exc}", retry_after=RETRY_AFTER_S) from exc
            except DeploymentUnavailableError as exc:
                raise NotReady(exc.message, retry_after=RETRY_AFTER_S) from exc
        raise ReplicaLost(f"the critic replica died {self.attempts} times; retry", retry_after=RETRY_AFTER_S)


class ReplicaHeader:
    """Name the critic replica that scored a request in the answer's X-FIRM-Replica header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        named: list[str] = []
        token = _answered_by.set(named)

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start" and named:
                message.setdefault("headers", []).append((REPLICA_HEADER, named[-1].encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            _answered_by.reset(token)


class BelowPrefix:
    """Show the app each path below the application's route prefix, as `firm-serve` sees its paths: keys,
    limits and metrics go by the path (`/readyz` needs no key, whatever prefix the application is under)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        if scope["type"] == "http" and root and scope["path"].startswith(root):
            path = scope["path"][len(root) :] or "/"
            scope = {**scope, "path": path, "raw_path": path.encode("latin-1"), "root_path": ""}
        await self.app(scope, receive, send)


def ingress_app(pool: CriticPool, settings: Settings, metrics: Metrics, metrics_page: MetricsPage) -> FastAPI:
    """The server's app over `pool`, naming in each scoring answer the critic replica that scored it."""
    app = serving_app(settings, pool, metrics, metrics_page=metrics_page)
    app.add_middleware(ReplicaHeader)  # outside the server's own: it sees the answer's first message
    app.add_middleware(BelowPrefix)  # outermost: every other one sees the path as firm-serve would
    return app


@serve.deployment
@serve.ingress()
class FirmIngress:
    """The Ray Serve deployment that receives the application's HTTP traffic."""

    async def __init__(
        self,
        critics: dict[str, DeploymentHandle],
        board: DeploymentHandle,
        server: dict[str, Any],
        *,
        attempts: int,
        require_api_keys: bool = False,
        push_interval_s: float = 5.0,
    ) -> None:
        context = serve.get_replica_context()
        metrics = Metrics()
        self.board = board
        pool = CriticPool(critics, attempts)
        self.served = ingress_app(pool, served_settings(server, require_api_keys), metrics, self._every_replica_page)
        labels = {"deployment": context.deployment, "replica": context.replica_tag}
        identity = f"{context.deployment}#{context.replica_tag}"
        pushing = share_metrics(board, identity, labelled_registry(metrics.registry, labels), push_interval_s)
        self._pushing = asyncio.create_task(pushing, name="share-metrics")

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.served

    async def _every_replica_page(self) -> bytes:
        page: str = await self.board.merged.remote()
        return page.encode("utf-8")

    async def __del__(self) -> None:
        pushing = getattr(self, "_pushing", None)
        if pushing is not None:
            pushing.cancel()
            await asyncio.gather(pushing, return_exceptions=True)
