"""A client that disconnects cancels its own work and no one else's: over real HTTP, against a real firm-serve
process on the tiny critic."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.types import Message

from clients.images import encode
from server.disconnect import ClientDisconnected, until_disconnect
from tests.support import metric_value, picture, running_server

LEAVER_ITEMS, STAYER_ITEMS = 64, 2


# ---------------------------------------------------------------------------- the race, on its own


class Connection:
    """The ASGI side of one request whose body was read: `receive` waits until the test says the client left
    (or, with `broken`, fails as a server's receive might)."""

    def __init__(self, broken: bool = False) -> None:
        self.gone = asyncio.Event()
        self.broken = broken

    async def receive(self) -> Message:
        if self.broken:
            raise RuntimeError("receive failed")
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, self.receive)


def test_work_that_finishes_first_gives_its_answer_or_its_error() -> None:
    async def answer() -> str:
        return "scores"

    async def fail() -> str:
        raise ValueError("bad request")

    async def scenario() -> tuple[str, BaseException | str]:
        first = await until_disconnect(Connection().request(), answer())
        try:
            return first, await until_disconnect(Connection().request(), fail())
        except ValueError as exc:
            return first, exc

    first, second = asyncio.run(scenario())
    assert first == "scores"
    assert isinstance(second, ValueError) and str(second) == "bad request"


def test_a_disconnect_cancels_the_work_and_waits_for_its_clean_up() -> None:
    cleaned_up = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.Event().wait()  # queued forever
        finally:
            cleaned_up.set()
        return "never"

    async def scenario() -> ClientDisconnected:
        connection = Connection()
        race = asyncio.create_task(until_disconnect(connection.request(), work()))
        connection.gone.set()
        try:
            await race
        except ClientDisconnected as exc:
            assert cleaned_up.is_set()  # the work's own clean-up ran before the route gave up
            return exc
        raise AssertionError("the work outlived its client")

    error = asyncio.run(scenario())
    assert error.status == 499 and error.code == "client_disconnected"


def test_when_the_disconnect_cannot_be_heard_the_work_goes_on() -> None:
    async def work() -> str:
        await asyncio.sleep(0)
        return "scores"

    assert asyncio.run(until_disconnect(Connection(broken=True).request(), work())) == "scores"


def test_a_cancelled_route_cancels_its_work_too() -> None:
    """The server stopping the route (shutdown) reaches the work, as a disconnect would."""
    running, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def scenario() -> None:
        route = asyncio.create_task(until_disconnect(Connection().request(), work()))
        await running.wait()
        route.cancel()
        await asyncio.gather(route, return_exceptions=True)

    asyncio.run(scenario())
    assert cancelled.is_set()


# ---------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def one_call_per_batch_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    """One judge call per engine batch, so a request's calls wait in the queue one after another."""
    with running_server(cache_dir, "--max-batch-size", "1", "--max-items-per-request", str(LEAVER_ITEMS)) as url:
        yield url


def _items(tag: int, n: int) -> dict:
    """`n` items no cache can answer and no two of which share a judge call: each image and prompt is new."""
    items = []
    for k in range(n):
        image = picture("red" if tag % 2 else "blue")
        image.putpixel((k % image.width, 0), (tag % 256, k % 256, 7))
        items.append({"image": encode(image), "prompt": f"a square ({tag}.{k})"})
    return {"items": items}


async def _until(client: httpx.AsyncClient, holds: Callable[[str], bool], what: str, timeout_s: float = 60.0) -> str:
    """The /metrics page once `holds(page)`; fails, naming `what`, if that does not happen within `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        page = (await client.get("/metrics")).text
        if holds(page):
            return page
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.01)


def test_a_client_that_disconnects_cancels_its_queued_calls_and_only_its_own(one_call_per_batch_url: str) -> None:
    url = one_call_per_batch_url
    queued = lambda page: metric_value(page, "firm_queue_depth")  # noqa: E731
    in_flight = lambda page: metric_value(page, "firm_requests_in_flight")  # noqa: E731

    async def scenario() -> tuple[httpx.Response, int, str, str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as watcher:
            judges = len(
                next(m for m in (await watcher.get("/v1/models")).json()["models"] if m["task"] == "gen")["judges"]
            )
            before = (await watcher.get("/metrics")).text
            async with httpx.AsyncClient(base_url=url, timeout=120) as leaver:
                leaving = asyncio.create_task(leaver.post("/v1/gen/score", json=_items(1, LEAVER_ITEMS)))
                await _until(
                    watcher, lambda p: queued(p) >= LEAVER_ITEMS * judges // 2, "the leaver's calls are queued"
                )
                staying = asyncio.create_task(watcher.post("/v1/gen/score", json=_items(2, STAYER_ITEMS)))
                await _until(watcher, lambda p: in_flight(p) == 2, "both requests are in")
                leaving.cancel()  # the client gives up: httpx closes its connection
                await asyncio.gather(leaving, return_exceptions=True)
            answer = await staying
            after = await _until(
                watcher, lambda p: queued(p) == 0 and in_flight(p) == 0, "the queue is empty and nothing is in flight"
            )
            return answer, judges, before, after

    answer, judges, before, after = asyncio.run(scenario())
    # the one who stayed got its whole answer
    assert answer.status_code == 200, answer.text
    assert [r["reward"] is not None for r in answer.json()["results"]] == [True] * STAYER_ITEMS

    moved = lambda name, **labels: metric_value(after, name, **labels) - metric_value(before, name, **labels)  # noqa: E731
    calls = (LEAVER_ITEMS + STAYER_ITEMS) * judges - moved("firm_cache_hits_total")
    ran, cancelled = moved("firm_engine_batch_size_sum"), moved("firm_cancelled_calls_total")
    assert cancelled > 0  # the counter moved
    assert ran < calls  # the leaver's queued calls never reached the engine
    assert calls <= ran + cancelled <= calls + 1  # each call ran or was cancelled; one may have been both
    assert moved("firm_requests_total", route="/v1/gen/score", status="499") == 1  # the server saw the leaver go
    assert moved("firm_requests_total", route="/v1/gen/score", status="200") == 1
