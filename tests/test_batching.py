"""The micro-batcher's contract, driven by a small engine written against the plug-in interface."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from server.batching import MicroBatcher
from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.metrics import Metrics


class EchoEngine(Engine):
    """Answers each request with its text after `delay` seconds; can be told to fail a batch."""

    name = "echo"

    def __init__(self, delay: float = 0.02) -> None:
        super().__init__("echo", ("1", "2", "3", "4", "5"))
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_on: set[str] = set()
        self.refuse: set[str] = set()  # answered with an EngineError of their own, as vllm and openai do
        self.drop_one = False

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        texts = [str(r.parts[-1]) for r in requests]
        self.batches.append(texts)
        await asyncio.sleep(self.delay)
        if self.fail_on & set(texts):
            raise RuntimeError("device fell over")
        results = [EngineError("refused") if t in self.refuse else GenerationResult(text=t) for t in texts]
        return results[:-1] if self.drop_one else results


def _request(text: str) -> GenerationRequest:
    return GenerationRequest(parts=(text,), max_new_tokens=8)


async def _with_batcher(engine: EchoEngine, max_batch_size: int, max_wait_s: float, work):  # type: ignore[no-untyped-def]
    batcher = MicroBatcher(engine, Metrics(), "test", max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    await batcher.start()
    try:
        return await work(batcher)
    finally:
        await batcher.close()


def test_concurrent_calls_share_batches_up_to_the_maximum() -> None:
    engine = EchoEngine()

    async def work(batcher: MicroBatcher) -> list[list[object]]:
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

    async def work(batcher: MicroBatcher) -> tuple[list[object], list[object]]:
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

    async def work(batcher: MicroBatcher) -> list[object]:
        return await batcher.submit([_request("a"), _request("b")])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.0, work=work))
    assert all(isinstance(o, EngineError) for o in outcomes)


def test_a_wrong_number_of_results_is_an_engine_error_for_every_call() -> None:
    engine = EchoEngine()
    engine.drop_one = True

    async def work(batcher: MicroBatcher) -> list[object]:
        return await batcher.submit([_request("a"), _request("b")])

    outcomes = asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.01, work=work))
    assert all(isinstance(o, EngineError) and "0 results for 1" in str(o) for o in outcomes)


def test_calls_of_a_caller_that_left_are_not_run() -> None:
    engine = EchoEngine(delay=0.2)

    async def work(batcher: MicroBatcher) -> None:
        running = asyncio.create_task(batcher.submit([_request("first")]))
        await asyncio.sleep(0.05)  # "first" is now on the engine
        abandoned = asyncio.create_task(batcher.submit([_request("abandoned")]))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await running
        await asyncio.sleep(0.05)

    asyncio.run(_with_batcher(engine, max_batch_size=4, max_wait_s=0.0, work=work))
    assert engine.batches == [["first"]]


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
