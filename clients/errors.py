"""The client's exceptions, one hierarchy mirroring the server's error responses."""

from __future__ import annotations

import httpx

from clients.retry import retry_after


class FirmError(Exception):
    """Base of every error the client raises."""


class RequestFailed(FirmError):
    """A call failed after its retries (connection errors, overload, server deadline)."""


class BadResponse(FirmError):
    """The server answered 200 with a body that is not the protocol's reply to the request."""


class DeadlineExceeded(RequestFailed):
    """The call's deadline passed before an answer came."""


class NoServerAvailable(RequestFailed):
    """No base URL is reachable and ready."""


class ServerError(FirmError):
    """The server answered with an error status."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class BadRequest(ServerError):
    """400 or 422: the body is not JSON, or does not match the protocol (a bug in the caller, never retried)."""


class Unauthorized(ServerError):
    """401/403: missing, wrong or insufficient API key."""


class NotFound(ServerError):
    """404: the route's model is switched off on this server."""


class PayloadTooLarge(ServerError):
    """413: the body, an image or the item count is over a server limit."""


class Overloaded(ServerError):
    """429/503: the server is busy, loading or asleep; retried, honouring Retry-After."""


class ServerTimeout(ServerError):
    """504: the server's own deadline passed; retried."""


class ServerFault(ServerError):
    """500/502: the server, or a proxy in front of it, failed; passing faults, so retried like 503."""


class ItemsFailed(FirmError):
    """Strict mode: some items came back without a reward."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        shown = "; ".join(f"{item_id}: {why}" for item_id, why in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} item(s) failed: {shown}{more}")
        self.failures = failures


_BY_STATUS: dict[int, type[ServerError]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    413: PayloadTooLarge,
    400: BadRequest,
    422: BadRequest,
    429: Overloaded,
    500: ServerFault,
    502: ServerFault,
    503: Overloaded,
    504: ServerTimeout,
}
RETRYABLE = (Overloaded, ServerTimeout, ServerFault)


def error_for(status: int, code: str, message: str, retry_after: float | None) -> ServerError:
    return _BY_STATUS.get(status, ServerError)(status, code, message, retry_after)


def server_error(response: httpx.Response) -> ServerError:
    """The typed error of an error answer, from the server's error body (or the text of one that is not ours).

    >>> error = server_error(httpx.Response(429, headers={"Retry-After": "2"},
    ...                                     json={"error": {"code": "overloaded", "message": "queue full"}}))
    >>> type(error).__name__, error.code, error.retry_after
    ('Overloaded', 'overloaded', 2.0)
    >>> str(server_error(httpx.Response(502, text="<html>bad gateway</html>")))
    'HTTP 502 http_error: <html>bad gateway</html>'
    """
    try:
        body = response.json()["error"]
        code, message = str(body.get("code", "http_error")), str(body.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "http_error", response.text[:300]
    return error_for(response.status_code, code, message, retry_after(response.headers))
