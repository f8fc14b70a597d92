"""Structured logs: one JSON object per line, carrying the id of the request being served.

The request id comes from the client's X-Request-ID header (or is made up) and is echoed in
the response, so a client's retry and the server's log lines can be matched. Nothing that
identifies a caller beyond their key's name, and no image bytes, are ever logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)  # the API key's name
MAX_ID_CHARS = 128


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (rid := request_id.get()) is not None:
            line["request_id"] = rid
        if (name := caller.get()) is not None:
            line["key"] = name
        if (progress := getattr(record, "progress", None)) is not None:
            line["progress"] = progress
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal; a line that reports progress draws it as a bar."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        progress = getattr(record, "progress", None)
        if isinstance(progress, dict) and progress.get("total_bytes"):
            fraction = min(1.0, progress["done_bytes"] / progress["total_bytes"])
            filled = round(fraction * 24)
            record.message = f"[{'#' * filled}{'.' * (24 - filled)}] {record.message}"
        return super().formatMessage(record)


# Libraries that log: each goes through the root's one handler, none through a handler of its own.
LIBRARY_LOGGERS = ("huggingface_hub", "transformers", "vllm", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx")


def configure_logging(level: str, style: str) -> None:
    """One handler on the root, in the chosen format, for the server's lines and every library's."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # read when vLLM is imported: it adds no handler then
    handler = logging.StreamHandler()
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn goes through the handler too, not straight to stderr
    _route_libraries()


def _route_libraries() -> None:
    """Hugging Face's libraries add a stream handler of their own when imported (huggingface_hub's also
    propagates, so each of its lines came out twice); they are imported first so that theirs can be removed."""
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (adds its handler on import)
        import transformers.utils.logging as transformers_logging
    except ImportError:  # an install without the server's model libraries
        transformers_logging = None
    if transformers_logging is not None:
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        # A library's bar redrawn on stderr would break a JSON stream and interleave with a text one; the
        # server draws its own progress (downloads) as log lines.
        if hasattr(transformers_logging, "set_tqdm_hook"):  # transformers' own bars only
            transformers_logging.set_tqdm_hook(_no_bar)
        else:  # older releases: every bar, huggingface_hub's too
            transformers_logging.disable_progress_bar()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _no_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})


def incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text[:MAX_ID_CHARS] if text else None
    return None


class RequestContext:
    """Put the request id in the log context and in the response's X-Request-ID header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = incoming_id(scope)
        rid = given or uuid.uuid4().hex
        scope.setdefault("state", {})["client_request_id"] = given
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
