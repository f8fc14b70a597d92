"""Identical judge calls shared across requests: a shared call outlives any one of its requests, and is
cancelled only when the last request waiting for it has gone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from server.batching import MicroBatcher, Outcome
from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.judge_cache import CallSharing, DeadlineMissed
from server.metrics import Metrics


class HeldEngine(Engine):
    """Answers each request with its text, but only once `release` is set; `started` tells a batch arrived."""

    name = "held"

    def __init__(self) -> None:
        super().__init__("held", ("1", "2", "3", "4", "5"))
        self.seen: list[GenerationRequest] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        self.seen.extend(requests)
        self.started.set()
        await self.release.wait()
        return [GenerationResult(text=str(r.parts[-1])) for r in requests]


def _request(text: str) -> GenerationRequest:
    return GenerationRequest(parts=(text,), max_new_tokens=8)


class Sharing:
    """A batcher over a held engine with call sharing in front, as the server builds them."""

    def __init__(self) -> None:
        self.engine = HeldEngine()
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self.engine, self.metrics, "test", max_batch_size=8, max_wait_s=0.0)
        self.sharing = CallSharing(capacity=16)
        self.hits = 0

    def run(self, *texts: str) -> asyncio.Task[list[Outcome]]:
        requests = [_request(t) for t in texts]
        return asyncio.create_task(self.sharing.run(self.batcher, requests, list(texts), hit=self._hit))

    def _hit(self, n: int) -> None:
        self.hits += n

    def cancelled(self) -> float:
        return self.metrics.registry.get_sample_value("firm_cancelled_calls_total", {"model": "test"}) or 0.0


async def _joined(s: Sharing, hits: int) -> None:
    """Wait until the requests started so far have joined the calls already running (they count as hits)."""
    async with asyncio.timeout(5):
        while s.hits < hits:
            await asyncio.sleep(0)


async def _cancel(task: asyncio.Task[list[Outcome]]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_shared_call_survives_the_request_that_started_it_leaving() -> None:
    async def work() -> tuple[Sharing, list[Outcome]]:
        s = Sharing()
        await s.batcher.start()
        try:
            first = s.run("shared", "only-first")
            await s.engine.started.wait()  # both calls of the first request are on the engine
            second = s.run("shared")
            await _joined(s, 1)
            await _cancel(first)
            s.engine.release.set()
            async with asyncio.timeout(5):
                return s, await second
        finally:
            await s.batcher.close()

    s, (answer,) = asyncio.run(work())
    assert isinstance(answer, GenerationResult) and answer.text == "shared"
    assert s.hits == 1  # the second request did share the call rather than run it again
    assert [str(r.parts[-1]) for r in s.engine.seen] == ["shared", "only-first"]
    # the first request's own call was abandoned and flagged, the shared one was not
    assert [r.cancelled.is_set() for r in s.engine.seen] == [False, True]
    assert s.cancelled() == 1


def test_a_queued_shared_call_stays_queued_while_anyone_waits_for_it() -> None:
    async def work() -> tuple[Sharing, list[Outcome], list[Outcome]]:
        s = Sharing()
        await s.batcher.start()
        try:
            blocker = s.run("blocker")
            await s.engine.started.wait()  # the engine is busy: what follows stays queued
            first, second, third = s.run("shared"), s.run("shared"), s.run("shared")
            await _joined(s, 2)
            await _cancel(first)
            await _cancel(third)
            s.engine.release.set()
            async with asyncio.timeout(5):
                return s, await second, await blocker
        finally:
            await s.batcher.close()

    s, (answer,), _ = asyncio.run(work())
    assert isinstance(answer, GenerationResult) and answer.text == "shared"
    assert [str(r.parts[-1]) for r in s.engine.seen] == ["blocker", "shared"]
    assert s.cancelled() == 0


def test_when_every_request_sharing_a_call_has_left_the_call_is_cancelled() -> None:
    async def work() -> tuple[Sharing, list[Outcome]]:
        s = Sharing()
        await s.batcher.start()
        try:
            blocker = s.run("blocker")
            await s.engine.started.wait()
            first, second = s.run("shared"), s.run("shared")
            await _joined(s, 1)
            await _cancel(first)
            await _cancel(second)
            s.engine.release.set()
            async with asyncio.timeout(5):
                await blocker
                return s, await s.run("after")  # the loop got past where the shared call was queued
        finally:
            await s.batcher.close()

    s, (after,) = asyncio.run(work())
    assert isinstance(after, GenerationResult)
    assert [str(r.parts[-1]) for r in s.engine.seen] == ["blocker", "after"]  # it never ran
    assert s.cancelled() == 1  # one engine call, however many requests shared it


def test_a_running_shared_call_is_flagged_when_its_last_request_leaves_and_a_new_one_runs_it_again() -> None:
    async def work() -> tuple[Sharing, list[Outcome]]:
        s = Sharing()
        await s.batcher.start()
        try:
            first = s.run("shared")
            await s.engine.started.wait()
            second = s.run("shared")
            await _joined(s, 1)
            await _cancel(first)
            await _cancel(second)
            third = s.run("shared")  # arrives after everyone left: a fresh call, not the abandoned one
            s.engine.release.set()
            async with asyncio.timeout(5):
                return s, await third
        finally:
            await s.batcher.close()

    s, (answer,) = asyncio.run(work())
    assert isinstance(answer, GenerationResult) and answer.text == "shared"
    assert [r.cancelled.is_set() for r in s.engine.seen] == [True, False]
    assert s.cancelled() == 1


def test_a_finished_call_is_cached() -> None:
    async def work() -> tuple[Sharing, list[Outcome]]:
        s = Sharing()
        s.engine.release.set()
        await s.batcher.start()
        try:
            await s.run("kept")
            return s, await s.run("kept")
        finally:
            await s.batcher.close()

    s, (again,) = asyncio.run(work())
    assert isinstance(again, GenerationResult) and again.text == "kept"
    assert len(s.engine.seen) == 1 and s.hits == 1


def _past_deadline(capacity: int) -> tuple[list[Outcome], list[Outcome], float]:
    """Two requests share a held call; the first has a deadline that passes while it is held, the second
    none. Returns both outcomes and the calls cancelled."""

    async def work() -> tuple[list[Outcome], list[Outcome], float]:
        s = Sharing()
        s.sharing = CallSharing(capacity)
        await s.batcher.start()
        try:
            loop = asyncio.get_running_loop()
            hurried = asyncio.create_task(
                s.sharing.run(s.batcher, [_request("x")], ["x"], hit=s._hit, deadline=loop.time() + 0.05)
            )
            await s.engine.started.wait()
            patient = s.run("x")
            short = await hurried  # its deadline passes while the engine is held
            s.engine.release.set()
            return short, await patient, s.cancelled()
        finally:
            await s.batcher.close()

    return asyncio.run(work())


def test_a_deadline_leaves_a_shared_call_to_the_requests_still_waiting() -> None:
    short, full, cancelled = _past_deadline(capacity=16)
    assert isinstance(short[0], DeadlineMissed)
    assert isinstance(full[0], GenerationResult) and full[0].text == "x"
    assert cancelled == 0  # the patient request still waited for the call


def test_a_deadline_without_sharing_drops_the_call() -> None:
    short, full, cancelled = _past_deadline(capacity=0)
    assert isinstance(short[0], DeadlineMissed)
    assert isinstance(full[0], GenerationResult)  # its own call, run after the first was abandoned
    assert cancelled == 1
