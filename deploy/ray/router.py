"""The HTTP ingress of the Ray application: routes each request by path to a critic deployment.

`/v1/edit/*` goes to the deployment serving the editing critic and `/v1/gen/*` to the one
serving generation (the same deployment unless the critics are split). `/readyz` and
`/v1/models` ask every deployment and merge the answers; `/metrics` answers with the metrics
board's pages (each replica's as of its last push); every other path (`/healthz`, the API
docs) goes to the first deployment, whose app answers it as `firm-serve` does, 404 included.

A critic replica that dies under a request is the one failure the ingress absorbs: scoring is
idempotent, so the request is sent again (another replica takes it) and, when the attempts run
out, answered 503 with Retry-After, which clients retry. Ray's own answer would be a 500, which
means a bug and is never retried. When `max_queued_requests` requests already wait for a free
critic replica, the next is answered 429 with Retry-After rather than queued without end.
A client that disconnects before its body has arrived gets nothing forwarded: a truncated body
must not be scored.
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from clients.protocol import ModelsResponse, ReadinessResponse
from deploy.ray.forwarding import REPLICA_HEADER, Answer, Forwarded
from server.errors import error_response
from server.scoring import DISABLED

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/v1/admin/"
RETRY_AFTER_S = 1.0


class BodyTooLarge(Exception):
    """The request body passed the limit while it streamed in."""


class ClientGone(Exception):
    """The client disconnected before its whole body arrived."""


@serve.deployment
@serve.ingress()
class FirmIngress:
    """The Ray Serve deployment that receives the application's HTTP traffic."""

    def __init__(
        self, critics: dict[str, DeploymentHandle], board: DeploymentHandle, max_body_bytes: int, attempts: int
    ) -> None:
        self.router = PathRouter(critics, board, max_body_bytes, attempts)

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.router


class PathRouter:
    """A plain ASGI app that forwards whole requests to the critic deployments."""

    def __init__(
        self, critics: dict[str, DeploymentHandle], board: DeploymentHandle, max_body_bytes: int, attempts: int
    ) -> None:
        self.critics, self.board, self.max_body_bytes, self.attempts = critics, board, max_body_bytes, attempts
        by_name = {handle.deployment_name: handle for handle in critics.values()}
        self.deployments = list(by_name.values())  # each distinct deployment once, edit's first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})  # the API has no websockets
            return
        path = _app_path(scope)
        if path.startswith(ADMIN_PREFIX):
            message = "admin routes are not served through Ray Serve: replicas scale instead of sleeping"
            await error_response(404, "not_found", message)(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except BodyTooLarge:
            message = f"request body is over the limit of {self.max_body_bytes} bytes"
            await error_response(413, "body_too_large", message, limit=self.max_body_bytes)(scope, receive, send)
            return
        except ClientGone:
            log.info("client left during the upload of %s %s; nothing forwarded", scope["method"], path)
            return
        request = Forwarded(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b""),
            headers=list(scope["headers"]),
            body=body,
            client=tuple(scope["client"]) if scope.get("client") else None,
        )
        answer = await self._route(request)
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _route(self, request: Forwarded) -> Answer:
        for task in ("edit", "gen"):
            if request.path.startswith(f"/v1/{task}/"):
                return await self._forward(self.critics[task], request)
        if request.path in ("/readyz", "/v1/models") and len(self.deployments) > 1:
            answers = [await self._forward(deployment, request) for deployment in self.deployments]
            return _merge_readiness(answers) if request.path == "/readyz" else _merge_models(answers)
        answer = await self._forward(self.deployments[0], request)
        if request.path == "/metrics" and answer.status == 200:  # the replica checked the key, if one is needed
            page = (await self.board.merged.remote()).encode("utf-8")
            headers = [(k, v) for k, v in answer.headers if k.lower() != REPLICA_HEADER]  # the page is every replica's
            return Answer(200, _with_length(headers, len(page)), page)
        return answer

    async def _forward(self, deployment: DeploymentHandle, request: Forwarded) -> Answer:
        for attempt in range(1, self.attempts + 1):
            try:
                return await deployment.forward.remote(request)
            except RayActorError as exc:
                log.warning(
                    "a critic replica died under %s %s (attempt %d): %s", request.method, request.path, attempt, exc
                )
            except BackPressureError as exc:
                return _refusal(429, "overloaded", f"every critic replica is busy: {exc}")
            except DeploymentUnavailableError as exc:
                return _refusal(503, "not_ready", exc.message)
        return _refusal(503, "replica_lost", f"the critic replica died {self.attempts} times; retry")


def _app_path(scope: Scope) -> str:
    """The path below the application's route prefix, as the critic app knows its routes."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _refusal(status: int, code: str, message: str) -> Answer:
    response = error_response(status, code, message, retry_after=RETRY_AFTER_S)
    return Answer(status, list(response.raw_headers), bytes(response.body))


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


def _json(status: int, content: str) -> Answer:
    body = content.encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return Answer(status, headers, body)


def _merge_readiness(answers: list[Answer]) -> Answer:
    """Ready when every deployment is; each critic's state comes from the deployment that serves it."""
    states: dict[str, str] = {}
    for answer in answers:
        try:
            readiness = ReadinessResponse.model_validate_json(answer.body)
        except ValidationError:
            return answer  # a refusal (no replica yet, overload) says more than a merge could
        for task, state in readiness.models.items():
            if state != DISABLED or task not in states:
                states[task] = state
    ready = all(answer.status == 200 for answer in answers)
    merged = ReadinessResponse(ready=ready, models=states)
    return _json(200 if ready else 503, json.dumps(merged.model_dump(exclude_none=True)))


def _merge_models(answers: list[Answer]) -> Answer:
    """The model cards of every deployment; any refusal (e.g. a missing API key) is passed on as is."""
    refused = next((answer for answer in answers if answer.status != 200), None)
    if refused is not None:
        return refused
    cards = [card for answer in answers for card in ModelsResponse.model_validate_json(answer.body).models]
    return _json(200, ModelsResponse(models=cards).model_dump_json())
