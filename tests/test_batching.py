"""The micro-batcher's contract, driven by a small engine written against the plug-in interface."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import pytest

from server.batching import DirectRunner, MicroBatcher, Outcome, QueuedCall
from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.metrics import Metrics


class EchoEngine(Engine):
    """Answers each request with its text after `delay` seconds; can be told to fail a batch, or to hold
    every batch until `release` is set (`started` is set when a batch reaches it)."""

    name = "echo"

    def __init__(self, delay: float = 0.02) -> None:
        super().__init__("echo", ("1", "2", "3", "4", "5"))
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_on: set[str] = set()
        self.refuse: set[str] = set()  # answered with an EngineError of their own, as vllm and openai do
        self.drop_one = False
        self.seen: list[GenerationRequest] = []
        self.started: asyncio.Event | None = None
        self.release: asyncio.Event | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        texts = [str(r.parts[-1]) for r in requests]
        self.batches.append(texts)
        self.seen.extend(requests)
        if self.started is not None:
            self.started.set()
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.delay)
        if self.fail_on & set(texts):
            raise RuntimeError("device fell over")
        results = [EngineError("refused") if t in self.refuse else GenerationResult(text=t) for t in texts]
        return results[:-1] if self.drop_one else results


def _request(text: str) -> GenerationRequest:
    return GenerationRequest(parts=(text,), max_new_tokens=8)


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": "test"}) or 0.0


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait, at most `timeout_s`, until `condition()` holds, letting the event loop run meanwhile."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def _with_batcher(engine: EchoEngine, max_batch_size: int, max_wait_s: float, work):  # type: ignore[no-untyped-def]
    batcher = MicroBatcher(engine, Metrics(), "test", max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    await batcher.start()
    try:
        return await work(batcher)
    finally:
        await batcher.close()


def test_concurrent_calls_share_batches_up_to_the_maximum() -> None:
    engine = EchoEngine()

    async def work(batcher: MicroBatcher) -> list[list[Outcome]]:
        return await asyncio.gather(*(batcher.submit([_request(f"{i}a"), _request(f"{i}b")]) for i in range(10)))

    answers = asyncio.run(_with_batcher(engine, max_batch_size=8, max_wait_s=0.05, work=work))
    assert [[r.text for r in pair] for pair in answers] == [[f"{i}a", f"{i}b"] for i in range(10)]  # type: ignore[union-attr]
    assert max(len(b) for b in engine.batches) == 8
    assert sum(len(b) for b in engine.batches) == 20
    for batch in engine.batches:  # one request's calls are never split across batches here
        assert all(f"{t[:-1]}a" in batch and f"{t[:-1]}b" in batch for t in batch)


def test_a_call_that_breaks_its_batch_fails_alone() -> None:
    engine = EchoEngine()
    engine.fail_on = {"bad"}

    async def work(batcher: MicroBatcher) -> tuple[list[Outcome], list[Outcome]]:
        first = await batcher.submit([_request("bad"), _request("x")])
        second = await batcher.submit([_request("good")])
        return first, second

    first, second = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.0, work=work))
    assert isinstance(first[0], EngineError) and "device fell over" in str(first[0])
    assert isinstance(first[1], GenerationResult) and first[1].text == "x"  # retried alone, it succeeds
    assert isinstance(second[0], GenerationResult) and second[0].text == "good"
    assert engine.batches == [["bad", "x"], ["bad"], ["x"], ["good"]]


def test_an_engine_that_is_down_fails_every_call_with_engine_error() -> None:
    engine = EchoEngine()
    engine.fail_on = {"a", "b"}

    async def work(batcher: MicroBatcher) -> list[Outcome]:
        return await batcher.submit([_request("a"), _request("b")])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.0, work=work))
    assert all(isinstance(o, EngineError) for o in outcomes)


def test_a_wrong_number_of_results_is_an_engine_error_for_every_call() -> None:
    engine = EchoEngine()
    engine.drop_one = True

    async def work(batcher: MicroBatcher) -> list[Outcome]:
        return await batcher.submit([_request("a"), _request("b")])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.01, work=work))
    assert all(isinstance(o, EngineError) and "0 results for 1" in str(o) for o in outcomes)


def test_calls_of_a_caller_that_left_are_not_run() -> None:
    """Its queued calls leave the queue at once and never reach the engine; they are counted as cancelled."""
    engine = EchoEngine(delay=0.0)
    metrics = Metrics()

    async def work() -> tuple[float, float]:
        engine.started, engine.release = asyncio.Event(), asyncio.Event()
        batcher = MicroBatcher(engine, metrics, "test", max_batch_size=4, max_wait_s=0.0)
        await batcher.start()
        try:
            running = asyncio.create_task(batcher.submit([_request("first")]))
            await engine.started.wait()  # "first" is now on the engine
            abandoned = asyncio.create_task(batcher.submit([_request("abandoned-1"), _request("abandoned-2")]))
            await _until(lambda: _sample(metrics, "firm_queue_depth") == 2)
            abandoned.cancel()
            await _until(lambda: _sample(metrics, "firm_queue_depth") == 0)
            engine.release.set()
            await running
            await batcher.submit([_request("after")])  # the loop went on past where the abandoned calls were
            return _sample(metrics, "firm_cancelled_calls_total"), _sample(metrics, "firm_queue_depth")
        finally:
            await batcher.close()

    cancelled, depth = asyncio.run(work())
    assert engine.batches == [["first"], ["after"]]
    assert (cancelled, depth) == (2, 0)


def test_a_call_abandoned_on_the_engine_is_flagged_and_only_that_one() -> None:
    engine = EchoEngine(delay=0.0)

    async def work(batcher: MicroBatcher) -> list[Outcome]:
        engine.started, engine.release = asyncio.Event(), asyncio.Event()
        leaving = asyncio.create_task(batcher.submit([_request("leaving")]))
        staying = asyncio.create_task(batcher.submit([_request("staying")]))
        await engine.started.wait()
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        engine.release.set()
        return await staying

    (answer,) = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.05, work=work))
    assert isinstance(answer, GenerationResult) and answer.text == "staying"
    assert engine.batches == [["leaving", "staying"]]
    assert [r.cancelled.is_set() for r in engine.seen] == [True, False]


def test_repeated_engine_failures_make_the_runner_unhealthy_until_a_success() -> None:
    engine = EchoEngine(delay=0.0)
    engine.fail_on = {"bad"}

    async def work(batcher: MicroBatcher) -> list[bool]:
        seen = []
        for text in ("bad", "bad", "bad", "good"):
            await batcher.submit([_request(text)])
            seen.append(batcher.healthy)
        return seen

    batcher_health = asyncio.run(_with_batcher(engine, max_batch_size=1, max_wait_s=0.0, work=work))
    assert batcher_health == [True, True, False, True]


def test_an_engine_that_answers_only_errors_turns_unhealthy_without_retrying_them() -> None:
    """Engines that report failures per call (vllm, openai): no second round of calls, and readiness still drops."""
    engine = EchoEngine(delay=0.0)
    engine.refuse = {"down-1", "down-2"}

    async def work(batcher: MicroBatcher) -> list[bool]:
        seen = []
        for _ in range(3):
            outcomes = await batcher.submit([_request("down-1"), _request("down-2")])
            assert all(isinstance(o, EngineError) for o in outcomes)
            seen.append(batcher.healthy)
        await batcher.submit([_request("down-1"), _request("fine")])  # one success is enough
        seen.append(batcher.healthy)
        return seen

    health = asyncio.run(_with_batcher(engine, max_batch_size=2, max_wait_s=0.05, work=work))
    assert health == [True, True, False, True]
    assert [len(b) for b in engine.batches] == [2, 2, 2, 2]  # never split and retried one by one


def test_closed_loop_workers_are_gathered_into_one_batch_per_round() -> None:
    """Eight workers that each send their next call shortly after their answer: the batcher waits
    for all of them instead of starting a batch with whoever queued up while the last one ran."""
    engine = EchoEngine(delay=0.05)

    async def work(batcher: MicroBatcher) -> None:
        async def worker(w: int) -> None:
            await asyncio.sleep(0.01 * w)  # they start out of step
            for round_ in range(6):
                await batcher.submit([_request(f"{w}.{round_}")])
                await asyncio.sleep(0.005 + 0.002 * w)  # a client's round trip

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(_with_batcher(engine, max_batch_size=64, max_wait_s=0.2, work=work))
    sizes = [len(b) for b in engine.batches]
    assert sum(sizes) == 48
    # the workers start out of step and end out of step, but in between every round is one batch
    assert sizes.count(8) >= 4, sizes


def test_a_lone_caller_is_not_kept_waiting() -> None:
    engine = EchoEngine(delay=0.0)

    async def work(batcher: MicroBatcher) -> float:
        started = asyncio.get_running_loop().time()
        for i in range(5):
            await batcher.submit([_request(str(i))])
        return asyncio.get_running_loop().time() - started

    elapsed = asyncio.run(_with_batcher(engine, max_batch_size=64, max_wait_s=5.0, work=work))
    assert elapsed < 5.0  # five rounds, none of which waited out the 5 s max_wait


@pytest.mark.parametrize(("calls", "poisoned"), [(16, 11), (64, 0), (64, 63), (256, 100)])
def test_a_failed_batch_is_bisected_so_one_bad_call_costs_about_log2_n_engine_calls(calls: int, poisoned: int) -> None:
    """Each good call gets its answer, the poisoned one its own error, in at most 1 + 2·log₂ n engine calls
    (the old one-by-one retry took n + 1)."""
    engine = EchoEngine(delay=0.0)
    engine.fail_on = {"poison"}
    texts = ["poison" if i == poisoned else f"call-{i}" for i in range(calls)]

    async def work(batcher: MicroBatcher) -> list[Outcome]:
        return await batcher.submit([_request(t) for t in texts])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=calls, max_wait_s=0.0, work=work))
    for text, outcome in zip(texts, outcomes, strict=True):
        if text == "poison":
            assert isinstance(outcome, EngineError) and "device fell over" in str(outcome)
        else:
            assert isinstance(outcome, GenerationResult) and outcome.text == text
    assert len(engine.batches) <= 1 + 2 * math.log2(calls), engine.batches
    assert ["poison"] in engine.batches  # the bad call's error is from running it alone


def test_two_bad_calls_in_one_batch_each_fail_alone() -> None:
    engine = EchoEngine(delay=0.0)
    engine.fail_on = {"bad-3", "bad-12"}
    texts = [f"bad-{i}" if i in (3, 12) else f"good-{i}" for i in range(16)]

    async def work(batcher: MicroBatcher) -> list[Outcome]:
        return await batcher.submit([_request(t) for t in texts])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=16, max_wait_s=0.0, work=work))
    failed = [t for t, o in zip(texts, outcomes, strict=True) if isinstance(o, EngineError)]
    assert failed == ["bad-3", "bad-12"]
    assert all(o.text == t for t, o in zip(texts, outcomes, strict=True) if isinstance(o, GenerationResult))


def test_each_caller_of_a_failed_batch_gets_its_own_answer() -> None:
    """Calls of several requests in one batch: only the request that sent the bad call sees an error."""
    engine = EchoEngine(delay=0.0)
    engine.fail_on = {"bad"}

    async def work(batcher: MicroBatcher) -> list[list[Outcome]]:
        sends = [["a", "b"], ["c", "bad"], ["d"], ["e", "f", "g"]]
        return await asyncio.gather(*(batcher.submit([_request(t) for t in texts]) for texts in sends))

    answers = asyncio.run(_with_batcher(engine, max_batch_size=8, max_wait_s=0.05, work=work))
    assert engine.batches[0] == ["a", "b", "c", "bad", "d", "e", "f", "g"]  # they did share the failing batch
    shown = [[o.text if isinstance(o, GenerationResult) else "error" for o in a] for a in answers]
    assert shown == [["a", "b"], ["c", "error"], ["d"], ["e", "f", "g"]]


def test_a_batch_loop_that_dies_fails_its_pending_calls_and_starts_again(caplog: pytest.LogCaptureFixture) -> None:
    """A fault in the loop itself (not the engine, whose failures are answers): the calls it held, on the engine
    and queued, are answered with an error instead of hanging; it is logged and counted; the next calls work."""
    engine = EchoEngine(delay=0.0)
    metrics = Metrics()

    async def work() -> tuple[list[Outcome], list[Outcome], list[Outcome]]:
        engine.started, engine.release = asyncio.Event(), asyncio.Event()
        batcher = MicroBatcher(engine, metrics, "test", max_batch_size=1, max_wait_s=0.0)
        real = batcher._run_engine

        async def broken(requests: list[GenerationRequest]) -> list[Outcome]:
            batcher._run_engine = real  # type: ignore[method-assign]
            await real(requests)
            raise RuntimeError("a fault in the batch loop")

        batcher._run_engine = broken  # type: ignore[method-assign]
        await batcher.start()
        try:
            on_engine = asyncio.create_task(batcher.submit([_request("on-engine")]))
            await engine.started.wait()
            queued = asyncio.create_task(batcher.submit([_request("queued")]))
            await _until(lambda: _sample(metrics, "firm_queue_depth") == 1)
            engine.release.set()
            async with asyncio.timeout(5):
                first, second = await on_engine, await queued
            return first, second, await batcher.submit([_request("after")])
        finally:
            await batcher.close()

    first, second, after = asyncio.run(work())
    for outcome in (*first, *second):
        assert isinstance(outcome, EngineError) and "batch loop failed" in str(outcome)
    assert isinstance(after[0], GenerationResult) and after[0].text == "after"
    assert _sample(metrics, "firm_batch_loop_restarts_total") == 1
    assert _sample(metrics, "firm_queue_depth") == 0
    assert any("batch loop" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_queued_call_is_a_typed_record() -> None:
    engine = EchoEngine(delay=0.0)

    async def work() -> list[QueuedCall]:
        engine.started, engine.release = asyncio.Event(), asyncio.Event()
        batcher = MicroBatcher(engine, Metrics(), "test", max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit([_request("first")]))
            await engine.started.wait()
            batcher.launch([_request("a"), _request("b")])
            queued = list(batcher._queue)
            engine.release.set()
            await first
            return queued
        finally:
            await batcher.close()

    queued = asyncio.run(work())
    assert [type(c) for c in queued] == [QueuedCall, QueuedCall]
    assert [str(c.request.parts[-1]) for c in queued] == ["a", "b"]
    assert queued[0].submission == queued[1].submission and queued[0].arrival <= time.monotonic()


# ---------------------------------------------------------------------------- the direct runner


def test_direct_runner_stops_the_engine_only_when_every_call_is_abandoned() -> None:
    engine = EchoEngine(delay=0.0)
    metrics = Metrics()

    async def work() -> tuple[bool, object]:
        engine.started, engine.release = asyncio.Event(), asyncio.Event()
        runner = DirectRunner(engine, metrics, "test")
        futures = runner.launch([_request("left"), _request("kept")])
        await engine.started.wait()
        futures[0].cancel()
        await asyncio.sleep(0)
        still_running = bool(runner._tasks)
        engine.release.set()
        kept = await futures[1]
        both = runner.launch([_request("x"), _request("y")])
        for future in both:
            future.cancel()
        await _until(lambda: not runner._tasks)
        await runner.close()
        return still_running, kept

    still_running, kept = asyncio.run(work())
    assert still_running
    assert isinstance(kept, GenerationResult) and kept.text == "kept"
    assert [r.cancelled.is_set() for r in engine.seen] == [True, False, True, True]
    assert _sample(metrics, "firm_cancelled_calls_total") == 3
