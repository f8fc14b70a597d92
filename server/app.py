"""The FastAPI app: the server's middleware and route table over a scoring service.

`create_app` is `firm-serve`'s app: its own scoring service, loaded in the background while the
process already answers. `serving_app` puts any service behind the same middleware, error
mapping and routes; the Ray ingress uses it with a service that forwards to critic replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from fastapi import FastAPI
from prometheus_client import generate_latest

from clients.tasks import TASKS
from server.assembly import build_service
from server.errors import install_error_handlers
from server.idempotency import RecentAnswers
from server.metrics import Metrics
from server.middleware import install_middleware
from server.routes import MetricsPage, Service, route_table
from server.settings import Settings

log = logging.getLogger(__name__)
_served = " and ".join(f"{spec.title} ({spec.reward} reward)" for spec in TASKS.values())
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class Startable(Protocol):
    """What a lifespan asks of a scoring service."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@contextlib.asynccontextmanager
async def service_lifespan(service: Startable) -> AsyncIterator[None]:
    """The service's life in a process: its weights load in the background (so /healthz answers and
    /readyz says 'loading' meanwhile) and its engines close on the way out, loaded or not."""
    loading = asyncio.create_task(service.start(), name="load-models")
    loading.add_done_callback(_said_if_failed)
    try:
        yield
    finally:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await service.close()


def _said_if_failed(loading: asyncio.Task[None]) -> None:
    """A start that dies on an error no critic's state caught is said in the log, never dropped."""
    if not loading.cancelled() and (error := loading.exception()) is not None:
        log.error("loading the critics failed", exc_info=error)


def create_app(settings: Settings) -> FastAPI:
    """`firm-serve`'s app: the critics of `settings`, loaded while the app starts."""
    metrics = Metrics()
    service = build_service(settings, metrics)
    return serving_app(settings, service, metrics, lifespan=lambda _: service_lifespan(service))


def serving_app(
    settings: Settings,
    service: Service,
    metrics: Metrics,
    *,
    lifespan: Lifespan | None = None,
    metrics_page: MetricsPage | None = None,
) -> FastAPI:
    """`service` behind the server's middleware, error mapping and route table, limited and keyed by
    `settings`; `/metrics` answers with `metrics_page` (by default, `metrics`' own page)."""

    async def own_page() -> bytes:
        return generate_latest(metrics.registry)

    app = FastAPI(
        title="FIRM reward server",
        version="1",
        summary=f"Scores {_served} with the FIRM critics.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.metrics_page = metrics_page or own_page
    app.state.settings = settings
    app.state.answers = RecentAnswers(settings.idempotency_window_s)
    install_error_handlers(app)
    install_middleware(
        app, service=service, metrics=metrics, keys=settings.key_ring(), max_body_bytes=settings.max_body_bytes
    )
    app.include_router(route_table())
    return app
