"""The route table: every route the API answers, for `firm-serve`'s app and the Ray ingress alike.

The scoring routes come from the task table (`clients.tasks.TASKS`): each task gets a score route
and a group route, with its wire messages as body and answer. Every route takes the service from
`app.state`, awaits one method and returns its answer; validation is pydantic's and errors are
mapped in `server.errors`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from clients.protocol import (
    AdminResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelsResponse,
    ReadinessResponse,
    ScoringRequest,
    ScoringResponse,
)
from clients.tasks import TASKS, TaskSpec
from server.disconnect import until_disconnect
from server.errors import ServiceError
from server.lifecycle import ModelState
from server.logs import caller
from server.watch_routes import watch_routes

T = TypeVar("T")
R = TypeVar("R")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "The body is not valid JSON.",
        404: "The model for this route is switched off.",
        413: "The body, an image or the item count is over a limit.",
        422: "The request does not match the schema.",
        503: "The model is loading, asleep or has failed; see Retry-After.",
    }.items()
}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
    403: {"model": ErrorResponse, "description": "A scoring key used on an admin route."},
    404: {"model": ErrorResponse, "description": "Admin routes are off (no admin key set)."},
    409: {"model": ErrorResponse, "description": "The engine cannot sleep."},
}


class Service(Protocol):
    """The scoring service as the routes use it. Its status methods may answer at once (`firm-serve`'s
    own service) or have to be awaited (the Ray ingress asks its critic replicas)."""

    async def score(self, request: ScoringRequest) -> ScoringResponse: ...

    def states(self) -> Mapping[str, str] | Awaitable[Mapping[str, str]]: ...

    def failures(self) -> Mapping[str, str] | Awaitable[Mapping[str, str]]: ...

    def cards(self) -> list[ModelCard] | Awaitable[list[ModelCard]]: ...

    async def sleep(self) -> dict[str, str]: ...

    async def wake(self) -> dict[str, str]: ...

    def overloaded(self, task: str, calls: int = 1) -> ServiceError | None: ...


MetricsPage = Callable[[], Awaitable[bytes]]  # the Prometheus page `/metrics` answers with


def readiness(
    states: Mapping[str, str], failures: Mapping[str, str] | None = None, *, degraded_ready: bool = True
) -> ReadinessResponse:
    """Ready when every model is ready or switched off: the one rule `/readyz` answers by, whichever
    process the states come from. A failed model's reason comes with it. A degraded model (its canaries
    drifted) still scores, so it counts as ready unless `degraded_ready` is false (`--canary-fail-readiness`)."""
    fine = {ModelState.READY, ModelState.DISABLED} | ({ModelState.DEGRADED} if degraded_ready else set())
    ready = all(state in fine for state in states.values())
    return ReadinessResponse(ready=ready, models=dict(states), failures=dict(failures) if failures else None)


async def _answer(value: T | Awaitable[T]) -> T:
    """A status method's answer, given at once or awaited."""
    return await value if inspect.isawaitable(value) else value  # type: ignore[no-any-return]


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


async def _once(request: Request, score: Callable[[T], Awaitable[R]], body: T) -> R:
    """Score, unless this is a retry (same caller, route and X-Request-ID) of a request already answered.
    The caller (the API key's name) is part of the key: another caller reusing an id gets its own scores.
    A client that disconnects cancels its own work (`server.disconnect`)."""
    client_id = request.scope.get("state", {}).get("client_request_id")
    key = f"{caller.get()}:{request.url.path}:{client_id}" if client_id else None
    answer, replayed = await until_disconnect(request, request.app.state.answers.once(key, lambda: score(body)))
    if replayed:
        request.app.state.metrics.replayed.inc()
    return answer  # type: ignore[no-any-return]


def _scoring_route(
    router: APIRouter,
    path: str,
    body_type: type[ScoringRequest],
    answer_type: type[ScoringResponse],
    *,
    spec: TaskSpec,
    name: str,
    summary: str,
    description: str,
) -> None:
    """One scoring route: its body parsed as `body_type`, scored by the service, answered as `answer_type`."""

    async def endpoint(body: ScoringRequest, request: Request) -> ScoringResponse:
        return await _once(request, _service(request).score, body)

    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__annotations__ = {"body": body_type, "request": Request, "return": answer_type}  # what FastAPI reads
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        response_model=answer_type,
        responses=ERRORS,
        tags=[spec.name],
        name=name,
        summary=summary,
        description=description,
    )


def _scoring_routes(router: APIRouter, spec: TaskSpec) -> None:
    """A task's two scoring routes, as its table entry describes them."""
    first, second = (dimension.replace("_", " ") for dimension in spec.dimensions)
    _scoring_route(
        router,
        spec.score_path,
        spec.score_request,
        spec.score_response,
        spec=spec,
        name=f"score_{spec.name}",
        summary=f"Score {spec.title}",
        description=f"Score each item on {first} and {second}; the reward is {spec.reward}.",
    )
    _scoring_route(
        router,
        spec.group_path,
        spec.group_request,
        spec.group_response,
        spec=spec,
        name=f"score_{spec.name}_group",
        summary=f"Score a group ({spec.title})",
        description=f"Score a GRPO group of {spec.group_members}; adds group mean, std and advantages.",
    )


def _admin_routes(router: APIRouter) -> None:
    @router.post("/v1/admin/sleep", response_model=AdminResponse, responses=ADMIN_ERRORS, tags=["admin"])
    async def sleep(request: Request) -> AdminResponse:
        """Offload the critics' weights to free the GPU for a trainer; scoring answers 503 until wake."""
        return AdminResponse(models=await _service(request).sleep())

    @router.post("/v1/admin/wake", response_model=AdminResponse, responses=ADMIN_ERRORS, tags=["admin"])
    async def wake(request: Request) -> AdminResponse:
        """Load the weights back after sleep."""
        return AdminResponse(models=await _service(request).wake())


def _status_routes(router: APIRouter) -> None:
    @router.get("/v1/models", response_model=ModelsResponse, tags=["status"])
    async def models(request: Request) -> ModelsResponse:
        """The served critics, their revisions and engines."""
        return ModelsResponse(models=await _answer(_service(request).cards()))

    @router.get("/healthz", response_model=HealthResponse, tags=["status"])
    async def healthz() -> HealthResponse:
        """The process is alive (models may still be loading)."""
        return HealthResponse()

    @router.get(
        "/readyz",
        response_model=ReadinessResponse,
        responses={503: {"model": ReadinessResponse}},
        tags=["status"],
    )
    async def readyz(request: Request) -> JSONResponse:
        """Every enabled model is loaded and its engine healthy."""
        service = _service(request)
        strict = getattr(request.app.state.settings, "canary_fail_readiness", False)
        body = readiness(await _answer(service.states()), await _answer(service.failures()), degraded_ready=not strict)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.ready else 503)

    @router.get("/metrics", tags=["status"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics."""
        page: MetricsPage = request.app.state.metrics_page
        return Response(await page(), media_type=CONTENT_TYPE_LATEST)


def route_table() -> APIRouter:
    """Every route: the scoring routes of each task in the table, then the admin, status and watch routes."""
    router = APIRouter()
    for spec in TASKS.values():
        _scoring_routes(router, spec)
    _admin_routes(router)
    _status_routes(router)
    router.include_router(watch_routes())
    return router
