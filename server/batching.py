"""Hand judge calls to an engine: gathered into micro-batches, or directly.

`MicroBatcher` collects concurrent calls into one `Engine.generate` (up to `max_batch_size`,
waiting at most `max_wait` after the oldest call arrived), runs one batch at a time, and lets
the event loop keep accepting requests meanwhile. `DirectRunner` is for engines that schedule
by themselves. Both return, per call, a result or the exception that failed it, so one bad
batch fails only its own items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from server.metrics import Metrics

log = logging.getLogger(__name__)

Outcome = GenerationResult | BaseException


class Runner(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]: ...


async def _run_engine(engine: Engine, requests: list[GenerationRequest], metrics: Metrics, label: str) -> list[Outcome]:
    """One engine batch; if it fails, each call is retried alone so one bad input fails only itself."""
    outcomes = await _run_batch(engine, requests, metrics, label)
    if len(requests) > 1 and all(isinstance(o, BaseException) for o in outcomes):
        log.warning("retrying the %d calls of a failed batch one by one on %s", len(requests), label)
        outcomes = [(await _run_batch(engine, [r], metrics, label))[0] for r in requests]
    return outcomes


async def _run_batch(engine: Engine, requests: list[GenerationRequest], metrics: Metrics, label: str) -> list[Outcome]:
    metrics.engine_batch_size.labels(model=label).observe(len(requests))
    started = time.perf_counter()
    try:
        results = await engine.generate(requests)
    except Exception as exc:  # the engine's failure becomes each item's engine_error
        log.exception("engine %s failed on a batch of %d", label, len(requests))
        metrics.engine_failures.labels(model=label).inc()
        return [EngineError(f"engine failed: {type(exc).__name__}: {exc}")] * len(requests)
    finally:
        metrics.engine_batch_seconds.labels(model=label).observe(time.perf_counter() - started)
    if len(results) != len(requests):
        metrics.engine_failures.labels(model=label).inc()
        error = EngineError(f"engine returned {len(results)} results for {len(requests)} requests")
        return [error] * len(requests)
    return [r if isinstance(r, GenerationResult | EngineError) else _wrong_type(r) for r in results]


def _wrong_type(result: object) -> EngineError:
    return EngineError(f"engine returned a {type(result).__name__}, not a GenerationResult")


class DirectRunner:
    def __init__(self, engine: Engine, metrics: Metrics, label: str) -> None:
        self.engine, self.metrics, self.label = engine, metrics, label

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        return await _run_engine(self.engine, list(requests), self.metrics, self.label)


_Pending = tuple[GenerationRequest, "asyncio.Future[Outcome]", float]


class MicroBatcher:
    def __init__(self, engine: Engine, metrics: Metrics, label: str, *, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.engine, self.metrics, self.label = engine, metrics, label
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.label}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            _, future, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(EngineError("server is shutting down"))

    async def submit(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """Queue every call of one request at once, so they can share a batch."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[Outcome]] = []
        for request in requests:
            future: asyncio.Future[Outcome] = loop.create_future()
            futures.append(future)
            self._queue.put_nowait((request, future, now))
        self._update_depth()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for future in futures:  # the caller left: drop its calls that have not run yet
                future.cancel()
            raise

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels(model=self.label).set(self._queue.qsize())

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = batch[0][2] + self.max_wait_s  # waiting counts from the oldest call's arrival
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._update_depth()
        return [item for item in batch if not item[1].done()]

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            outcomes = await _run_engine(self.engine, [r for r, _, _ in batch], self.metrics, self.label)
            for (_, future, _), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
