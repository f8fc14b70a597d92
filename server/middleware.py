"""The server's ASGI middleware: what every request passes through before its route.

`install_middleware` puts the stack on an app in its one order, for `firm-serve`'s app and the
Ray ingress alike, so both refuse, count and label requests the same way. From the outside in:

- `RequestContext`: the request id in every log line and in the X-Request-ID answer header;
- `RequestMetrics`: requests counted and timed by route and status, refusals included;
- `Authentication`: keys checked before any body is read;
- `EarlyRefusal`: a scoring request for a model whose queue is full is refused unread;
- `BodySizeLimit`: a body over the limit is refused, declared or streamed.
"""

from __future__ import annotations

import time
from typing import Protocol

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.tasks import task_of_path
from server.errors import ServiceError, error_response
from server.logs import RequestContext
from server.metrics import Metrics
from server.security import Authentication, KeyRing


class Admits(Protocol):
    """What early refusal asks of the scoring service."""

    def overloaded(self, task: str, calls: int = 1) -> ServiceError | None: ...


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

    def __init__(self, app: ASGIApp, service: Admits) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = task_of_path(scope.get("path", "")) if scope["type"] == "http" else None
        refusal = self.service.overloaded(spec.name) if spec else None
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


def install_middleware(app: FastAPI, *, service: Admits, metrics: Metrics, keys: KeyRing, max_body_bytes: int) -> None:
    """The server's middleware stack on `app`; the last one added is the outermost."""
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(EarlyRefusal, service=service)
    app.add_middleware(Authentication, keys=keys)  # before the body is read
    app.add_middleware(RequestMetrics, metrics=metrics)  # outside the refusals, so they are counted too
    app.add_middleware(RequestContext)  # outermost: every log line of the request carries its id
