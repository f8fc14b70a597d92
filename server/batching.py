"""Hand judge calls to an engine: gathered into micro-batches, or directly.

`MicroBatcher` collects concurrent calls into one `Engine.generate` (up to `max_batch_size`, or the
engine's own `batch_limit`; it waits, at most `max_wait`, for the callers of the previous batch to
send their next calls), runs one batch at a time, and lets the event loop keep accepting requests meanwhile.
`DirectRunner` is for engines that schedule by themselves. Both answer, per call, a result or
the exception that failed it: a batch the engine fails whole is split in halves until the
calls that break it fail alone, so one bad input costs about 2·log₂ n engine calls and no one
else's answer. Both know how fast calls drain (for Retry-After) and whether the engine keeps
failing (for readiness).

`launch` starts calls and hands back one future per call; cancelling a future abandons its call
(dropped if it has not started, flagged through `GenerationRequest.cancelled` if it has), which is
how a caller that left, or the last of several callers sharing a call, stops work no one awaits.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.metrics import Metrics

log = logging.getLogger(__name__)

Outcome = GenerationResult | BaseException
RATE_WINDOW_S = 60.0


class Runner:
    """What both runners share: the engine call with failure isolation, abandoning, and the bookkeeping."""

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

    def launch(self, requests: Sequence[GenerationRequest]) -> list[asyncio.Future[Outcome]]:
        """Start the calls; one future per call, in order, that ends with its outcome (never an exception).
        Cancel a future to abandon its call."""
        raise NotImplementedError

    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """The outcomes of `requests`; if the caller is cancelled, the calls are abandoned."""
        if not requests:
            return []
        return list(await asyncio.gather(*self.launch(requests)))  # a cancelled gather cancels every future

    def _future(self, request: GenerationRequest) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(functools.partial(self._abandoned, request))
        return future

    def _abandoned(self, request: GenerationRequest, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            request.cancelled.set()  # an engine that is running it may stop early
            self.metrics.cancelled_calls.labels(model=self.label).inc()

    async def _run_engine(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """Run a batch, bisecting it if the engine fails it whole; readiness moves once per batch."""
        outcomes, _ = await self._bisect(requests, known_to_fail=False)
        if any(isinstance(o, GenerationResult) for o in outcomes):
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures == self.unhealthy_after:
                log.error(
                    "engine %s failed %d batches in a row: readiness is now false", self.label, self.unhealthy_after
                )
        self._done.append((time.monotonic(), len(requests)))
        return outcomes

    async def _bisect(self, requests: list[GenerationRequest], *, known_to_fail: bool) -> tuple[list[Outcome], bool]:
        """The outcomes of `requests`, and whether the engine took them as one batch: run them whole, and
        if the engine fails that, each half on its own.

        When a half ran whole but the pair failed, the other half must hold what broke it, so it is split
        without being run; a single call is always run, so the error it gets is its own."""
        if not known_to_fail or len(requests) == 1:
            outcomes, raised = await self._run_batch(requests)
            if not raised or len(requests) == 1:
                return outcomes, not raised
            log.warning("engine %s failed a batch of %d calls as a whole: splitting it", self.label, len(requests))
        half = len(requests) // 2
        first, first_whole = await self._bisect(requests[:half], known_to_fail=False)
        second, _ = await self._bisect(requests[half:], known_to_fail=first_whole)
        return first + second, False

    async def _run_batch(self, requests: list[GenerationRequest]) -> tuple[list[Outcome], bool]:
        """The outcomes, and whether the engine failed the batch whole (raised, or answered the wrong count).

        An engine may also answer some or all calls with an EngineError of their own (vllm, openai): those
        are that call's failure and are not retried, but a batch without a single result still counts
        as a failed engine batch."""
        self.metrics.engine_batch_size.labels(model=self.label).observe(len(requests))
        started = time.perf_counter()
        try:
            results = list(await self.engine.generate(requests))
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
        outcomes: list[Outcome] = [
            r if isinstance(r, GenerationResult | EngineError) else _wrong_type(r) for r in results
        ]
        if not any(isinstance(o, GenerationResult) for o in outcomes):
            self._count_failure()
        return outcomes, False

    def _count_failure(self) -> None:
        self.metrics.engine_failures.labels(model=self.label).inc()


def _wrong_type(result: object) -> EngineError:
    return EngineError(f"engine returned a {type(result).__name__}, not a GenerationResult")


class DirectRunner(Runner):
    """Each request's calls go to the engine at once, as one `generate`, in a task of their own; the task
    is cancelled when every one of its calls is abandoned."""

    def __init__(self, engine: Engine, metrics: Metrics, label: str, *, unhealthy_after: int = 3) -> None:
        super().__init__(engine, metrics, label, unhealthy_after=unhealthy_after)
        self._tasks: set[asyncio.Task[None]] = set()

    def launch(self, requests: Sequence[GenerationRequest]) -> list[asyncio.Future[Outcome]]:
        if not requests:
            return []
        futures = [self._future(request) for request in requests]
        task = asyncio.create_task(self._deliver(list(requests), futures), name=f"engine-{self.label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def stop_if_abandoned(_: asyncio.Future[Outcome]) -> None:
            if all(f.done() for f in futures) and any(f.cancelled() for f in futures):
                task.cancel()

        for future in futures:
            future.add_done_callback(stop_if_abandoned)
        return futures

    async def _deliver(self, requests: list[GenerationRequest], futures: list[asyncio.Future[Outcome]]) -> None:
        """Run the calls and hand out their outcomes; none is left unanswered, whatever happens."""
        outcomes: list[Outcome] = []
        try:
            outcomes = await self._run_engine(requests)
        except Exception as exc:
            log.exception("running a batch of %d calls on %s failed", len(requests), self.label)
            outcomes = [EngineError(f"the server failed to run the call: {type(exc).__name__}: {exc}")] * len(requests)
        finally:
            outcomes = outcomes or [EngineError("the call was stopped before it finished")] * len(requests)
            for future, outcome in zip(futures, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(eq=False)
class QueuedCall:
    """One judge call waiting for a batch: what to run, where its outcome goes, and whose it is."""

    request: GenerationRequest
    future: asyncio.Future[Outcome]
    arrival: float  # time.monotonic() when it was queued
    submission: int  # the launch() it came with: calls of one request share the number


class MicroBatcher(Runner):
    """One batch at a time from a queue of calls, by a loop task that is restarted if it ever dies."""

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
        # an engine that runs calls one at a time gains nothing from a gathered batch: they stay queued instead
        self.max_batch_size = min(max_batch_size, engine.batch_limit() or max_batch_size)
        self.max_wait_s = max_wait_s
        self._queue: collections.deque[QueuedCall] = collections.deque()  # live calls only: abandoned ones leave
        self._arrived = asyncio.Event()
        self._taken: list[QueuedCall] = []  # the batch being gathered or on the engine
        self._task: asyncio.Task[None] | None = None
        self._free_since = 0.0  # when the last batch finished
        self._submissions = 0  # launch() calls so far
        self._submissions_at_free = 0
        self._last_batch_submissions = 0  # distinct launch() calls the last batch answered

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"batcher-{self.label}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_pending(EngineError("server is shutting down"))

    def launch(self, requests: Sequence[GenerationRequest]) -> list[asyncio.Future[Outcome]]:
        """Queue every call of one request at once, so they can share a batch."""
        now = time.monotonic()
        self._submissions += 1
        calls = [QueuedCall(request, self._future(request), now, self._submissions) for request in requests]
        for call in calls:
            call.future.add_done_callback(functools.partial(self._leave_queue, call))
        self._queue.extend(calls)
        self._arrived.set()
        self._update_depth()
        return [call.future for call in calls]

    def _leave_queue(self, call: QueuedCall, future: asyncio.Future[Outcome]) -> None:
        """An abandoned call that has not started leaves the queue at once."""
        if future.cancelled() and call in self._queue:
            self._queue.remove(call)
            self._update_depth()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels(model=self.label).set(len(self._queue))

    def _fail_pending(self, error: EngineError) -> None:
        """Answer every call not yet answered (on the engine or queued) with `error`."""
        pending, self._taken = [*self._taken, *self._queue], []
        self._queue.clear()
        self._update_depth()
        for call in pending:
            if not call.future.done():
                call.future.set_result(error)

    async def _supervise(self) -> None:
        """Run the batch loop; if it dies, its pending calls fail (none hangs) and it starts again."""
        while True:
            try:
                await self._loop()
            except Exception as exc:
                log.exception("the batch loop of %s died; failing its pending calls and restarting it", self.label)
                self.metrics.batch_loop_restarts.labels(model=self.label).inc()
                self._fail_pending(EngineError(f"the server's batch loop failed: {type(exc).__name__}: {exc}"))

    def _callers_back(self) -> bool:
        """Have as many callers submitted since the last batch ended as that batch answered?

        Rollout workers run closed loops: a batch's callers come back with their next calls right
        after their answers. Waiting for them, rather than starting a batch with whoever queued up
        meanwhile, keeps the workers from splitting into cohorts that each pay the engine's fixed cost.
        """
        return self._submissions - self._submissions_at_free >= self._last_batch_submissions

    async def _wait_for_calls(self, deadline: float | None) -> bool:
        """Wait until a call is queued (True), or until `deadline` (time.monotonic()) passes (False)."""
        while not self._queue:
            self._arrived.clear()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _collect(self) -> None:
        """Take the next batch from the queue into `_taken`."""
        await self._wait_for_calls(None)
        self._taken = batch = [self._queue.popleft()]
        deadline = max(batch[0].arrival, self._free_since) + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if self._queue:
                batch.append(self._queue.popleft())
            elif self._callers_back() or not await self._wait_for_calls(deadline):
                break
        self._update_depth()
        log.debug(
            "batch of %d calls from %d submissions; %d callers back of %d expected, waited %.0f ms",
            len(batch),
            len({call.submission for call in batch}),
            self._submissions - self._submissions_at_free,
            self._last_batch_submissions,
            1000 * (time.monotonic() - max(batch[0].arrival, self._free_since)),
        )

    async def _loop(self) -> None:
        while True:
            await self._collect()
            batch = [call for call in self._taken if not call.future.done()]  # some may have left meanwhile
            if not batch:
                continue
            try:
                outcomes = await self._run_engine([call.request for call in batch])
            finally:
                self._free_since = time.monotonic()
                self._submissions_at_free = self._submissions
                self._last_batch_submissions = len({call.submission for call in batch})
            for call, outcome in zip(batch, outcomes, strict=True):
                if not call.future.done():
                    call.future.set_result(outcome)
            self._taken = []
