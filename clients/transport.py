"""POST a protocol message to one of several servers, with failover and bounded retries.

Replicas are picked by least outstanding requests. A replica that drops a connection, says it
is not ready (503) or sits behind a proxy that lost it (502) rests for a cool-down and has its
/readyz checked before it is used again. 429, 500, 502, 503 and 504 answers and connection errors
are retried under the retry policy, honouring Retry-After; any other 4xx is raised at once, since
a retry would get the same answer. Every attempt of one call carries the same X-Request-ID, so a
server can recognise a retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from clients.config import ClientConfig
from clients.errors import (
    RETRYABLE,
    BadResponse,
    DeadlineExceeded,
    FirmError,
    NoServerAvailable,
    Overloaded,
    RequestFailed,
    ServerError,
    ServerFault,
    error_for,
)
from clients.retry import retry_after

log = logging.getLogger(__name__)


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    resting_until: float = 0.0
    check_ready: bool = False


def server_error(response: httpx.Response) -> ServerError:
    try:
        body = response.json()["error"]
        code, message = str(body.get("code", "http_error")), str(body.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "http_error", response.text[:300]
    return error_for(response.status_code, code, message, retry_after(response.headers))


class Transport:
    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.replicas = [Replica(url) for url in config.base_urls]
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=max(16, 4 * config.max_in_flight * len(self.replicas)))
        self.http = httpx.AsyncClient(headers=headers, limits=limits, transport=transport, timeout=config.timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    def _rest(self, replica: Replica, why: str) -> None:
        replica.resting_until = time.monotonic() + self.config.cooldown_s
        replica.check_ready = True
        log.warning("server %s rests for %.0f s: %s", replica.url, self.config.cooldown_s, why)

    async def _is_ready(self, replica: Replica, deadline: float) -> bool:
        try:
            response = await self.http.get(
                f"{replica.url}/readyz", timeout=max(0.1, min(5.0, deadline - time.monotonic()))
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _pick(self, deadline: float) -> Replica:
        """The awake replica with the fewest requests in flight, its readiness checked after a rest.

        When every replica rests, the one whose rest ends first is tried anyway: resting steers
        traffic to the others, it never stops the retries of a single server.
        """
        for _ in range(len(self.replicas)):
            now = time.monotonic()
            awake = [r for r in self.replicas if r.resting_until <= now]
            if not awake:
                return min(self.replicas, key=lambda r: r.resting_until)
            replica = min(awake, key=lambda r: r.outstanding)
            if not replica.check_ready:
                return replica
            if await self._is_ready(replica, deadline):
                replica.check_ready = False
                return replica
            self._rest(replica, "not ready after its rest")
        return min(self.replicas, key=lambda r: r.resting_until)

    async def get(self, path: str) -> httpx.Response:
        """A status GET to the least busy awake replica (no retries)."""
        replica = await self._pick(time.monotonic() + self.config.timeout_s)
        try:
            return await self.http.get(f"{replica.url}{path}")
        except httpx.RequestError as exc:
            self._rest(replica, f"{type(exc).__name__}: {exc}")
            raise NoServerAvailable(f"{replica.url}: {type(exc).__name__}: {exc}") from exc

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.timeout_s
        headers = {"X-Request-ID": uuid.uuid4().hex}
        policy = self.config.retry
        last: FirmError | None = None
        for attempt in range(policy.max_attempts):
            replica = await self._pick(deadline)
            try:
                return await self._attempt(replica, path, body, headers, deadline)
            except (RequestFailed, *RETRYABLE) as exc:
                last = exc
            if attempt + 1 == policy.max_attempts:
                break
            wait = self._wait(replica, last, attempt)
            if time.monotonic() + wait >= deadline:
                raise DeadlineExceeded(
                    f"the {self.config.timeout_s:g} s deadline leaves no time for another attempt; last error: {last}"
                ) from last
            await asyncio.sleep(wait)
        raise RequestFailed(f"{policy.max_attempts} attempts failed; last error: {last}") from last

    def _wait(self, failed: Replica, error: FirmError, attempt: int) -> float:
        """No wait when another server is awake and the failure was this server's own (a drop, a
        timeout); otherwise back off, since an overloaded or faulting service needs time."""
        now = time.monotonic()
        elsewhere = any(r is not failed and r.resting_until <= now for r in self.replicas)
        if elsewhere and not isinstance(error, (Overloaded, ServerFault)):
            return 0.0
        asked = error.retry_after if isinstance(error, ServerError) else None
        return self.config.retry.delay(attempt, asked)

    async def _attempt(
        self, replica: Replica, path: str, body: dict[str, Any], headers: dict[str, str], deadline: float
    ) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline of {self.config.timeout_s:g} s passed")
        replica.outstanding += 1
        try:
            response = await self.http.post(f"{replica.url}{path}", json=body, headers=headers, timeout=remaining)
        except httpx.TimeoutException as exc:
            self._rest(replica, f"no answer in time ({type(exc).__name__})")
            raise DeadlineExceeded(f"{replica.url} gave no answer before the deadline") from exc
        except httpx.RequestError as exc:
            self._rest(replica, f"{type(exc).__name__}: {exc}")
            raise RequestFailed(f"{replica.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            replica.outstanding -= 1
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError as exc:
                raise BadResponse(f"{replica.url}: a 200 answer that is not JSON: {response.text[:200]!r}") from exc
            if not isinstance(body, dict):
                raise BadResponse(f"{replica.url}: a 200 answer that is not a JSON object: {response.text[:200]!r}")
            return body
        error = server_error(response)
        if response.status_code in (502, 503):
            self._rest(replica, f"{error.code}: {error.message}")
        raise error
