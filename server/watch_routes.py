"""The watch page's routes: `GET /watch` (one self-contained HTML page), `GET /watch/data` (what it polls)
and `POST /v1/admin/watch/baseline` (pin the last window as the baseline).

The page loads nothing from anywhere but this server: its charts are drawn by its own inline script.
A service without a watch (the Ray ingress) answers 404.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from server.errors import ServiceError
from server.watch.watch import Watch

PAGE = resources.files("server.watch").joinpath("page.html").read_text(encoding="utf-8")
Tag = Literal["low", "high", "failed", "flagged"]


class NoWatch(ServiceError):
    status = 404
    code = "not_found"


def _watch(request: Request) -> Watch:
    watch: Watch | None = getattr(request.app.state.service, "watch", None)
    if watch is None:
        raise NoWatch("this server keeps no watch (its critics are scored elsewhere)")
    return watch


def watch_routes() -> APIRouter:
    router = APIRouter(tags=["watch"])

    @router.get("/watch", response_class=HTMLResponse)
    async def watch_page(request: Request) -> HTMLResponse:
        """The watch page: score histograms against the baseline, reward over time, failure rates,
        canaries and recent items. It refreshes itself from /watch/data."""
        _watch(request)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @router.get("/watch/data")
    async def watch_data(
        request: Request,
        limit: Annotated[int, Query(ge=0, le=500, description="Most recent items to list.")] = 50,
        tag: Annotated[Tag | None, Query(description="Only the recent items with this tag.")] = None,
    ) -> dict[str, Any]:
        """The page's data: each critic's window, baseline and timeline, the canaries and the recent items."""
        service = request.app.state.service
        data = _watch(request).view(limit=limit, tag=tag)
        canaries = getattr(service, "canaries", None)
        data["canaries"] = canaries.view() if canaries is not None else None
        data["states"] = dict(service.states())
        return data

    @router.post("/v1/admin/watch/baseline", tags=["admin"])
    async def pin_baseline(request: Request) -> dict[str, str]:
        """Make the last window the baseline the page and the saturation gauges compare with."""
        _watch(request).pin_baseline()
        return {"baseline": "pinned"}

    return router
