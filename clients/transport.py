"""Failover across replicas of the reward service, as an httpx transport.

`FailoverTransport` sends each request to the least busy of several base URLs (the replica with
the fewest requests in flight). A replica that drops a connection, gives no answer in time, says
it is not ready (503) or sits behind a proxy that lost it (502) rests for a cool-down, and its
/readyz is checked before it gets a request again. The transport never retries: it answers what
the chosen replica answered, or raises the httpx error of the failure, and the retry loop above it
(`send_with_retries`, below) decides what to do next.

Requests name only a path on `ORIGIN`; the transport puts the chosen replica's URL in front:

>>> import asyncio
>>> seen = []
>>> def server(request: httpx.Request) -> httpx.Response:
...     seen.append(str(request.url))
...     return httpx.Response(200, json={})
>>> async def two_calls() -> None:
...     transport = FailoverTransport(["http://a:1", "http://b:2/critic"], transport=httpx.MockTransport(server))
...     async with httpx.AsyncClient(base_url=ORIGIN, transport=transport) as client:
...         await client.get("/v1/models")
...         transport.rest(transport.replicas[0], "a test")
...         await client.get("/v1/models")
>>> asyncio.run(two_calls())
>>> seen
['http://a:1/v1/models', 'http://b:2/critic/v1/models']
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from clients.errors import (
    RETRYABLE,
    DeadlineExceeded,
    FirmError,
    Overloaded,
    RequestFailed,
    ServerError,
    ServerFault,
    server_error,
)
from clients.retry import RetryPolicy

log = logging.getLogger(__name__)

ORIGIN = "http://replica"  # the origin requests are addressed to: the transport picks the real one
READY_PATH = "/readyz"
READY_TIMEOUT_S = 5.0  # the longest a readiness check of a rested replica may take
RESTING_STATUS = frozenset({502, 503})  # answers that say the replica itself cannot serve now


@dataclass
class Replica:
    """One base URL and what the transport knows of it."""

    url: str
    outstanding: int = 0  # requests sent to it and not yet answered
    resting_until: float = 0.0  # clock time before which it gets no request if another is awake
    check_ready: bool = False  # its /readyz must answer 200 before its next request


class _EnvironmentConnections(httpx.AsyncBaseTransport):
    """The connection pool of a plain httpx client: proxies (HTTP_PROXY, NO_PROXY) and certificates from
    the environment apply to each replica's URL, as they would to a client without failover."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._client = httpx.AsyncClient(limits=limits, timeout=None)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        await self._client.aclose()


class FailoverTransport(httpx.AsyncBaseTransport):
    """Spreads requests over replicas of one service, resting the failing ones.

    `transport` carries the requests to the replicas (a real connection pool by default; tests pass
    `httpx.MockTransport`); `clock` tells the time of rests (tests pass a fake one).
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        cooldown_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one base URL is needed")
        self.replicas = [Replica(url.rstrip("/")) for url in base_urls]
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._inner = transport or _EnvironmentConnections(limits or httpx.Limits())

    async def aclose(self) -> None:
        await self._inner.aclose()

    def awake(self) -> list[Replica]:
        """The replicas not resting now."""
        now = self._clock()
        return [r for r in self.replicas if r.resting_until <= now]

    def can_fail_over(self) -> bool:
        """Another replica can take the next attempt: there are several, and one is awake. A lone server is
        never sent its retry at once."""
        return len(self.replicas) > 1 and bool(self.awake())

    def rest(self, replica: Replica, why: str) -> None:
        """Keep requests away from `replica` for the cool-down; its readiness is checked after."""
        replica.resting_until = self._clock() + self.cooldown_s
        replica.check_ready = True
        log.warning("server %s rests for %.0f s: %s", replica.url, self.cooldown_s, why)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        replica = await self._pick(request)
        replica.outstanding += 1
        try:
            response = await self._inner.handle_async_request(_rebased(request, replica.url))
        except httpx.TransportError as exc:
            self.rest(replica, f"{type(exc).__name__}: {exc}")
            raise type(exc)(f"{replica.url}: {exc}", request=request) from exc
        finally:
            replica.outstanding -= 1
        if response.status_code in RESTING_STATUS:
            self.rest(replica, f"it answered {response.status_code}")
        return response

    async def _pick(self, request: httpx.Request) -> Replica:
        """The awake replica with the fewest requests in flight, its readiness checked after a rest.

        When every replica rests, the one whose rest ends first is tried anyway: resting steers
        traffic to the others, it never stops the retries of a single server.
        """
        for _ in self.replicas:
            awake = self.awake()
            if not awake:
                break
            replica = min(awake, key=lambda r: r.outstanding)
            if not replica.check_ready:
                return replica
            if await self._is_ready(replica, request):
                replica.check_ready = False
                return replica
            self.rest(replica, "not ready after its rest")
        return min(self.replicas, key=lambda r: r.resting_until)

    async def _is_ready(self, replica: Replica, request: httpx.Request) -> bool:
        """Whether the replica's /readyz answers 200, asked with the request's credentials, within the
        request's own timeout (at most `READY_TIMEOUT_S`)."""
        asked = request.extensions.get("timeout", {}).get("read")
        seconds = min(READY_TIMEOUT_S, asked) if asked is not None else READY_TIMEOUT_S
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        check = httpx.Request(
            "GET", replica.url + READY_PATH, headers=headers, extensions={"timeout": httpx.Timeout(seconds).as_dict()}
        )
        try:
            response = await self._inner.handle_async_request(check)
            await response.aread()  # the connection goes back to the pool
        except httpx.TransportError:
            return False
        return response.status_code == 200


def _rebased(request: httpx.Request, base_url: str) -> httpx.Request:
    """The same request addressed to a replica: its path and query after the replica's base URL."""
    url = httpx.URL(base_url + request.url.raw_path.decode("ascii"))
    headers = request.headers.copy()
    headers["host"] = url.netloc.decode("ascii")  # the replica's; httpx adds none to a request given a stream
    return httpx.Request(request.method, url, headers=headers, stream=request.stream, extensions=request.extensions)


async def send_with_retries(
    http: httpx.AsyncClient,
    request: httpx.Request,
    policy: RetryPolicy,
    *,
    timeout_s: float,
    can_fail_over: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> httpx.Response:
    """The 200 answer to `request`, attempted under `policy` within `timeout_s` (the retries' waits included).

    There is no wait before the next attempt when the failure was a replica's own (a drop, a
    timeout) and `can_fail_over()` says another replica is awake; an overloaded or faulting
    service gets the policy's backoff, or the Retry-After it asked for. Raises the last error's
    `FirmError` when the attempts run out, `DeadlineExceeded` when the deadline leaves no time.
    """
    request.headers.setdefault("X-Request-ID", uuid.uuid4().hex)
    deadline = time.monotonic() + timeout_s
    last: FirmError | None = None
    for attempt in range(policy.max_attempts):
        try:
            return await _attempt(http, request, deadline, timeout_s)
        except (RequestFailed, *RETRYABLE) as exc:
            last = exc
        if attempt + 1 == policy.max_attempts:
            break
        wait = 0.0
        if isinstance(last, (Overloaded, ServerFault)) or not can_fail_over():
            wait = policy.delay(attempt, last.retry_after if isinstance(last, ServerError) else None)
        if time.monotonic() + wait >= deadline:
            raise DeadlineExceeded(
                f"the {timeout_s:g} s deadline leaves no time for another attempt; last error: {last}"
            ) from last
        await sleep(wait)
    raise RequestFailed(f"{policy.max_attempts} attempts failed; last error: {last}") from last


async def _attempt(
    http: httpx.AsyncClient, request: httpx.Request, deadline: float, timeout_s: float
) -> httpx.Response:
    """One attempt within what is left of the deadline: the 200 answer, or the typed error of the failure."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline of {timeout_s:g} s passed")
    request.extensions["timeout"] = httpx.Timeout(remaining).as_dict()
    try:
        response = await http.send(request)
    except httpx.TimeoutException as exc:
        raise DeadlineExceeded(f"no answer before the deadline ({type(exc).__name__}: {exc})") from exc
    except httpx.RequestError as exc:
        raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise server_error(response)
    return response
