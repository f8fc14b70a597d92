"""A retried request (same key) waits for its first attempt; an abandoned first attempt leaves the retry
to score the request itself, and a failed one hands the retry its error."""

from __future__ import annotations

import asyncio

import pytest

from server.idempotency import RecentAnswers


def test_a_retry_scores_itself_when_the_first_attempt_is_abandoned() -> None:
    async def work() -> tuple[object, bool, int]:
        answers, held, runs = RecentAnswers(60.0), asyncio.Event(), []

        async def compute() -> str:
            runs.append(1)
            if len(runs) == 1:
                await held.wait()  # the first attempt never finishes: its caller leaves
            return f"answer {len(runs)}"

        first = asyncio.create_task(answers.once("k", compute))
        async with asyncio.timeout(5):
            while not runs:
                await asyncio.sleep(0)
        retry = asyncio.create_task(answers.once("k", compute))
        await asyncio.sleep(0)  # the retry is waiting on the first attempt
        first.cancel()
        answer, replayed = await retry
        return answer, replayed, len(runs)

    assert asyncio.run(work()) == ("answer 2", False, 2)


def test_a_retry_gets_the_first_attempts_error() -> None:
    async def work() -> None:
        answers, gate = RecentAnswers(60.0), asyncio.Event()

        async def compute() -> str:
            await gate.wait()
            raise ValueError("refused")

        first = asyncio.create_task(answers.once("k", compute))
        await asyncio.sleep(0)
        retry = asyncio.create_task(answers.once("k", compute))
        await asyncio.sleep(0)
        gate.set()
        for task in (first, retry):
            with pytest.raises(ValueError, match="refused"):
                await task

    asyncio.run(work())
