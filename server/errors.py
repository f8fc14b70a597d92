"""Request-level errors and the one place that turns exceptions into HTTP responses.

Every error body has the shape of `clients.protocol.ErrorResponse`. No traceback ever leaves
the server: unexpected exceptions are logged here and answered with a plain 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clients.protocol import ErrorBody, ErrorResponse
from server.images import ImageTooLarge

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, limit: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.retry_after = retry_after


class ModelDisabled(ServiceError):
    status, code = 404, "model_disabled"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Unsupported(ServiceError):
    status, code = 409, "unsupported"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


def error_response(
    status: int, code: str, message: str, *, limit: int | None = None, retry_after: float | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, limit=limit))
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _location(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


async def _on_service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, limit=exc.limit, retry_after=exc.retry_after)


async def _on_image_too_large(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageTooLarge)
    return error_response(413, "image_too_large", str(exc), limit=exc.limit)


def _not_json(exc: RequestValidationError) -> str | None:
    """Where and why a body that is not JSON fails to parse, in words, or None when it parsed: FastAPI reports
    the decoder's failure as a validation error whose location is the character offset."""
    for error in exc.errors():
        if error.get("type") != "json_invalid":
            continue
        reason = str((error.get("ctx") or {}).get("error", "it cannot be parsed"))
        loc, doc = tuple(error.get("loc", ())), exc.body
        if len(loc) == 2 and isinstance(loc[1], int) and isinstance(doc, str | bytes):
            text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc
            offset = loc[1]
            line = text.count("\n", 0, offset) + 1
            column = offset - text.rfind("\n", 0, offset)
            return f"the body is not valid JSON: {reason} at line {line}, column {column}"
        return f"the body is not valid JSON: {reason}"
    return None


def _not_sent_as_json(request: Request, exc: RequestValidationError) -> str | None:
    """Why a body was not read at all: FastAPI parses a body as JSON only under a JSON content type, and
    hands the model the raw bytes otherwise (curl's -d without a content-type header sends a form)."""
    if not isinstance(exc.body, bytes) or not any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
        return None
    sent = request.headers.get("content-type", "")
    return f"the body was not sent as JSON (content-type: {sent or 'none'}); send it as application/json"


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if (not_json := _not_json(exc)) is not None:
        return error_response(400, "invalid_json", not_json)
    if (not_sent := _not_sent_as_json(request, exc)) is not None:
        return error_response(422, "invalid_request", not_sent)
    problems = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:20]]
    return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")


async def _on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # JSON is UTF-8 text
        where = exc.__cause__.start
        return error_response(400, "invalid_json", f"the body is not valid JSON: it is not UTF-8 text (byte {where})")
    if exc.status_code == 400:  # parsed no further (nested too deeply): as malformed as a body that breaks the schema
        return error_response(422, "invalid_request", f"malformed request body: {exc.detail}")
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(ImageTooLarge, _on_image_too_large)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
