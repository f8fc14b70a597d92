"""An HTTP request carried whole between Ray deployments, and played against an ASGI app.

The ingress reads a request and hands it to a critic replica through a Ray deployment handle.
Between the two, the request travels inside Ray's own transport: Ray serialises the `Forwarded`
dataclass (and the `Answer` coming back) with its object serialisation, and nothing here listens
on a port. Only the external wire, client to Serve proxy, is HTTP with JSON bodies, exactly as
with `firm-serve`. The replica runs the request through the very FastAPI app `firm-serve`
serves, middleware and all. Scoring bodies and answers are small enough to travel in one piece.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]
REPLICA_HEADER = b"x-firm-replica"  # names the critic replica that produced an answer


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the ingress received it."""

    method: str
    path: str
    query: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class Answer:
    """One complete HTTP response."""

    status: int
    headers: Headers
    body: bytes


async def play(app: ASGIApp, request: Forwarded) -> Answer:
    """Run `request` through `app` in this process and collect its whole response."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query,
        "root_path": "",
        "headers": list(request.headers),
        "client": request.client,
        "server": None,
        "state": {},
    }
    done = asyncio.Event()
    delivered = False
    status, headers, chunks = 500, [], []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()  # the caller stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return Answer(status, [(bytes(k), bytes(v)) for k, v in headers], b"".join(chunks))
