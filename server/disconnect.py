"""Stop a request's work when its client disconnects.

A scoring request can queue hundreds of judge calls; a client that gave up (its own timeout, a
killed trainer) would otherwise keep them on the engine ahead of everyone else. `until_disconnect`
races the handler's work against the client's `http.disconnect`, as vLLM's `with_cancellation`
does: if the client goes first, the work is cancelled, which drops the request's queued calls and
flags its running ones (calls another request shares keep running for it).

It reads the request's remaining ASGI messages, so it is only for handlers whose body has already
been read (FastAPI has parsed it into a model). Starlette's `Request.is_disconnected` would need
polling, and does not see the disconnect through middleware that wraps `receive`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from server.errors import ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(ServiceError):
    """The client left before its answer: no one reads the response, but the status is logged and counted."""

    status, code = 499, "client_disconnected"  # nginx's "client closed request"


async def _disconnected(request: Request) -> None:
    """Return when the client has gone: every message after the body is read is either nothing or that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (and awaited, so its
    clean-up has run) and `ClientDisconnected` raised."""
    handler = asyncio.ensure_future(work)
    listener = asyncio.create_task(_disconnected(request), name="listen-for-disconnect")
    try:
        await asyncio.wait((handler, listener), return_when=asyncio.FIRST_COMPLETED)
        if not handler.done() and (error := listener.exception()) is not None:
            log.warning("cannot listen for the client's disconnect (%r): the work goes on regardless", error)
            await handler
        left = not handler.done()
    finally:
        listener.cancel()
        if not handler.done():
            handler.cancel()
        await asyncio.gather(handler, listener, return_exceptions=True)
    if left:
        log.info("the client disconnected before its answer: its work was cancelled")
        raise ClientDisconnected("the client disconnected before its answer; its work was cancelled")
    return handler.result()  # it finished first (or with the disconnect): its answer, or its error raised
