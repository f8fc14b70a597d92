"""Hand judge calls to an engine: gathered into micro-batches, or directly.

`MicroBatcher` collects concurrent calls into one `Engine.generate` (up to `max_batch_size`;
it waits, at most `max_wait`, for the callers of the previous batch to send their next calls),
runs one batch at a time, and lets the event loop keep accepting requests meanwhile.
`DirectRunner` is for engines that schedule by themselves. Both return, per call, a result or
the exception that failed it, so one bad batch fails only its own items; both know how fast
calls drain (for Retry-After) and whether the engine keeps failing (for readiness). A call
whose caller left is dropped if it has not started, and flagged as cancelled if it has.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence

from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.metrics import Metrics

log = logging.getLogger(__name__)

Outcome = GenerationResult | BaseException
RATE_WINDOW_S = 60.0


class Runner:
    """What both runners share: the engine call with failure isolation, and the bookkeeping."""

    def __init__(self, engine: Engine, metrics: Metrics, label: str, *, unhealthy_after: int = 3) -> None:
        self.engine, self.metrics, self.label = engine, metrics, label
        self.unhealthy_after = unhealthy_after
        self.consecutive_failures = 0
        self._done: collections.deque[tuple[float, int]] = collections.deque()  # (finished at, calls)

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.unhealthy_after

    def drain_rate(self) -> float | None:
        """Calls answered per second over the last minute, None before the first answer."""
        now = time.monotonic()
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()
        if not self._done:
            return None
        span = max(now - self._done[0][0], 1.0)
        return sum(n for _, n in self._done) / span

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        raise NotImplementedError

    async def _run_engine(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """One engine batch; if it raised, each call is retried alone so a bad input fails only itself."""
        outcomes, raised = await self._run_batch(requests)
        if raised and len(requests) > 1:
            log.warning("retrying the %d calls of a failed batch one by one on %s", len(requests), self.label)
            outcomes = [(await self._run_batch([r]))[0][0] for r in requests]
        self._done.append((time.monotonic(), len(requests)))
        return outcomes

    async def _run_batch(self, requests: list[GenerationRequest]) -> tuple[list[Outcome], bool]:
        """The outcomes, and whether the engine failed the batch whole (raised, or answered the wrong count).

        An engine may also answer some or all calls with an EngineError of their own (vllm, openai): those
        are that call's failure and are not retried here, but a batch without a single result still
        counts as a failed batch for readiness."""
        self.metrics.engine_batch_size.labels(model=self.label).observe(len(requests))
        started = time.perf_counter()
        try:
            results = await self.engine.generate(requests)
        except Exception as exc:  # the engine's failure becomes each item's engine_error
            log.exception("engine %s failed on a batch of %d", self.label, len(requests))
            self._count_failure()
            return [EngineError(f"engine failed: {type(exc).__name__}: {exc}")] * len(requests), True
        finally:
            self.metrics.engine_batch_seconds.labels(model=self.label).observe(time.perf_counter() - started)
        if len(results) != len(requests):
            self._count_failure()
            error = EngineError(f"engine returned {len(results)} results for {len(requests)} requests")
            return [error] * len(requests), True
        outcomes = [r if isinstance(r, GenerationResult | EngineError) else _wrong_type(r) for r in results]
        if any(isinstance(o, GenerationResult) for o in outcomes):
            self.consecutive_failures = 0
        else:
            self._count_failure()
        return outcomes, False

    def _count_failure(self) -> None:
        self.metrics.engine_failures.labels(model=self.label).inc()
        self.consecutive_failures += 1
        if self.consecutive_failures == self.unhealthy_after:
            log.error("engine %s failed %d batches in a row: readiness is now false", self.label, self.unhealthy_after)


def _wrong_type(result: object) -> EngineError:
    return EngineError(f"engine returned a {type(result).__name__}, not a GenerationResult")


def _cancel(requests: Sequence[GenerationRequest]) -> None:
    for request in requests:
        request.cancelled.set()


class DirectRunner(Runner):
    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        try:
            return await self._run_engine(list(requests))
        except asyncio.CancelledError:
            _cancel(requests)
            self.metrics.cancelled_calls.labels(model=self.label).inc(len(requests))
            raise


_Pending = tuple[GenerationRequest, "asyncio.Future[Outcome]", float, int]  # ..., arrival, submission


class MicroBatcher(Runner):
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        label: str,
        *,
        max_batch_size: int,
        max_wait_s: float,
        unhealthy_after: int = 3,
    ) -> None:
        super().__init__(engine, metrics, label, unhealthy_after=unhealthy_after)
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._free_since = 0.0  # when the last batch finished
        self._submissions = 0  # submit() calls so far
        self._submissions_at_free = 0
        self._last_batch_submissions = 0  # distinct submit() calls the last batch answered

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.label}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            _, future, _, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(EngineError("server is shutting down"))

    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """Queue every call of one request at once, so they can share a batch."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._submissions += 1
        futures: list[asyncio.Future[Outcome]] = []
        for request in requests:
            future: asyncio.Future[Outcome] = loop.create_future()
            futures.append(future)
            self._queue.put_nowait((request, future, now, self._submissions))
        self._update_depth()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            # The caller left: calls not started are dropped, running ones are told to stop.
            for future in futures:
                future.cancel()
            _cancel(requests)
            self.metrics.cancelled_calls.labels(model=self.label).inc(len(requests))
            raise

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels(model=self.label).set(self._queue.qsize())

    def _callers_back(self) -> bool:
        """Have as many callers submitted since the last batch ended as that batch answered?

        Rollout workers run closed loops: a batch's callers come back with their next calls right
        after their answers. Waiting for them, rather than starting a batch with whoever queued up
        meanwhile, keeps the workers from splitting into cohorts that each pay the engine's fixed cost.
        """
        return self._submissions - self._submissions_at_free >= self._last_batch_submissions

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = max(batch[0][2], self._free_since) + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._callers_back():
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._update_depth()
        log.debug(
            "batch of %d calls from %d submissions; %d callers back of %d expected, waited %.0f ms",
            len(batch),
            len({b[3] for b in batch}),
            self._submissions - self._submissions_at_free,
            self._last_batch_submissions,
            1000 * (time.monotonic() - max(batch[0][2], self._free_since)),
        )
        return [item for item in batch if not item[1].done()]

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                outcomes = await self._run_engine([r for r, _, _, _ in batch])
            finally:
                self._free_since = time.monotonic()
                self._submissions_at_free = self._submissions
                self._last_batch_submissions = len({submission for _, _, _, submission in batch})
            for (_, future, _, _), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
