"""The FastAPI app: thin routes over the scoring service.

Each scoring route takes the service from `app.state`, awaits one method and returns its
response model; validation is pydantic's and errors are mapped in `server.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.protocol import (
    AdminResponse,
    EditGroupRequest,
    EditGroupResponse,
    EditScoreRequest,
    EditScoreResponse,
    ErrorResponse,
    GenGroupRequest,
    GenGroupResponse,
    GenScoreRequest,
    GenScoreResponse,
    HealthResponse,
    ModelsResponse,
    ReadinessResponse,
)
from server.assembly import build_service
from server.disconnect import until_disconnect
from server.errors import error_response, install_error_handlers
from server.idempotency import RecentAnswers
from server.logs import RequestContext, caller
from server.metrics import Metrics
from server.scoring import DISABLED, READY, ScoringService
from server.security import Authentication
from server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        404: "The model for this route is switched off.",
        413: "The body, an image or the item count is over a limit.",
        422: "The request does not match the schema.",
        503: "The model is loading, asleep or has failed; see Retry-After.",
    }.items()
}
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
    403: {"model": ErrorResponse, "description": "A scoring key used on an admin route."},
    404: {"model": ErrorResponse, "description": "Admin routes are off (no admin key set)."},
    409: {"model": ErrorResponse, "description": "The engine cannot sleep."},
}


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: from Content-Length at once, or as the bytes stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413,
                "body_too_large",
                f"request body of {int(declared)} bytes is over the limit of {self.max_bytes}",
                limit=self.max_bytes,
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class EarlyRefusal:
    """Refuse scoring requests for a model whose queue is full before reading their bodies, so
    overload costs the server almost nothing (the scoring service re-checks with the exact count)."""

    def __init__(self, app: ASGIApp, service: ScoringService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        task = path.split("/")[2] if path.startswith(("/v1/edit/", "/v1/gen/")) else None
        refusal = self.service.overloaded(task) if task else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = error_response(
            refusal.status, refusal.code, refusal.message, limit=refusal.limit, retry_after=refusal.retry_after
        )
        await response(scope, receive, send)


class RequestMetrics:
    """Count requests and time them by route template and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    service = build_service(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Weights load in the background so /healthz answers (and /readyz says 'loading') meanwhile.
        loading = asyncio.create_task(service.start(), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await service.close()

    app = FastAPI(
        title="FIRM reward server",
        version="1",
        summary="Scores image edits (CME reward) and generated images (QMA reward) with the FIRM critics.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.answers = RecentAnswers(settings.idempotency_window_s)
    install_error_handlers(app)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(EarlyRefusal, service=service)
    app.add_middleware(Authentication, keys=settings.key_ring())  # before the body is read
    app.add_middleware(RequestMetrics, metrics=metrics)  # outside the refusals, so they are counted too
    app.add_middleware(RequestContext)  # outermost: every log line of the request carries its id
    _add_routes(app)
    return app


def _service(request: Request) -> ScoringService:
    return request.app.state.service


async def _once(request: Request, score: Callable[[T], Awaitable[R]], body: T) -> R:
    """Score, unless this is a retry (same caller, route and X-Request-ID) of a request already answered.
    The caller (the API key's name) is part of the key: another caller reusing an id gets its own scores.
    A client that disconnects cancels its own work (`server.disconnect`)."""
    client_id = request.scope.get("state", {}).get("client_request_id")
    key = f"{caller.get()}:{request.url.path}:{client_id}" if client_id else None
    answer, replayed = await until_disconnect(request, request.app.state.answers.once(key, lambda: score(body)))
    if replayed:
        request.app.state.metrics.replayed.inc()
    return answer


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/edit/score", response_model=EditScoreResponse, responses=_ERRORS, tags=["edit"])
    async def score_edits(body: EditScoreRequest, request: Request) -> EditScoreResponse:
        """Score image edits on execution and consistency; reward is CME."""
        return await _once(request, _service(request).score, body)

    @app.post("/v1/edit/score_group", response_model=EditGroupResponse, responses=_ERRORS, tags=["edit"])
    async def score_edit_group(body: EditGroupRequest, request: Request) -> EditGroupResponse:
        """Score a GRPO group of edits of one source image; adds group mean, std and advantages."""
        return await _once(request, _service(request).score, body)

    @app.post("/v1/gen/score", response_model=GenScoreResponse, responses=_ERRORS, tags=["gen"])
    async def score_generations(body: GenScoreRequest, request: Request) -> GenScoreResponse:
        """Score generated images on instruction following and quality; reward is QMA."""
        return await _once(request, _service(request).score, body)

    @app.post("/v1/gen/score_group", response_model=GenGroupResponse, responses=_ERRORS, tags=["gen"])
    async def score_generation_group(body: GenGroupRequest, request: Request) -> GenGroupResponse:
        """Score a GRPO group of images for one prompt; adds group mean, std and advantages."""
        return await _once(request, _service(request).score, body)

    @app.post("/v1/admin/sleep", response_model=AdminResponse, responses=_ADMIN_ERRORS, tags=["admin"])
    async def sleep(request: Request) -> AdminResponse:
        """Offload the critics' weights to free the GPU for a trainer; scoring answers 503 until wake."""
        return AdminResponse(models=await _service(request).sleep())

    @app.post("/v1/admin/wake", response_model=AdminResponse, responses=_ADMIN_ERRORS, tags=["admin"])
    async def wake(request: Request) -> AdminResponse:
        """Load the weights back after sleep."""
        return AdminResponse(models=await _service(request).wake())

    @app.get("/v1/models", response_model=ModelsResponse, tags=["status"])
    async def models(request: Request) -> ModelsResponse:
        """The served critics, their revisions and engines."""
        return ModelsResponse(models=_service(request).cards())

    @app.get("/healthz", response_model=HealthResponse, tags=["status"])
    async def healthz() -> HealthResponse:
        """The process is alive (models may still be loading)."""
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadinessResponse,
        responses={503: {"model": ReadinessResponse}},
        tags=["status"],
    )
    async def readyz(request: Request) -> JSONResponse:
        """Every enabled model is loaded and its engine healthy."""
        states = _service(request).states()
        ready = all(state in (READY, DISABLED) for state in states.values())
        body = ReadinessResponse(ready=ready, models=states)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)

    @app.get("/metrics", tags=["status"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
