"""Admission: which scoring requests the server takes, and how long it lets them run.

A request is refused before any work when the server is draining or its model's queue would
overflow (with a Retry-After from the measured drain rate); once taken, it counts as in flight
from arrival to answer and runs under the server deadline. The early-refusal middleware asks
the same question with one call before a body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from clients.protocol import Task
from server.errors import DeadlineExceeded, NotReady, Overloaded
from server.lifecycle import Lifecycle, TaskModel
from server.metrics import Metrics


class Admission:
    def __init__(self, lifecycle: Lifecycle, metrics: Metrics, *, max_queue: int, request_timeout_s: float) -> None:
        self.lifecycle, self.metrics = lifecycle, metrics
        self.max_queue, self.request_timeout_s = max_queue, request_timeout_s
        self.in_flight = 0
        self.pending_calls: dict[str, int] = {task: 0 for task in lifecycle.models}

    def overloaded(self, task: str, calls: int = 1) -> Overloaded | None:
        """The refusal (counted) when `calls` more judge calls would overflow `task`'s queue, with a
        Retry-After from the recent drain rate; None when they fit. Pending calls are those of every
        request of this model not yet answered. With the default of one call it tells, before a
        body is read, whether the queue is already full."""
        model = self.lifecycle.models.get(task)  # type: ignore[call-overload]
        if model is None:  # a switched-off task: the route answers 404 itself
            return None
        pending = self.pending_calls[task]
        if pending + calls <= self.max_queue:
            return None
        self.metrics.rejected.labels(reason="overloaded").inc()
        rate = model.runner.drain_rate()
        wait = (pending + calls) / rate if rate else 1.0
        return Overloaded(
            f"{pending} judge calls are already pending for the {task} model (limit {self.max_queue}); retry later",
            limit=self.max_queue,
            retry_after=min(max(wait, 1.0), 60.0),
        )

    @contextlib.asynccontextmanager
    async def admit(self, model: TaskModel, calls: int) -> AsyncIterator[None]:
        """One scoring request: refused while draining or when its model's queue is full, counted in
        flight from arrival (decoding included) to answer, and bounded by the server deadline."""
        task: Task = model.task.name
        if self.lifecycle.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            raise NotReady("the server is shutting down; retry on another replica", retry_after=5)
        if (refusal := self.overloaded(task, calls)) is not None:
            raise refusal
        self.in_flight += 1
        self.metrics.in_flight.inc()
        self.pending_calls[task] += calls
        try:
            async with asyncio.timeout(self.request_timeout_s):
                yield
        except TimeoutError as exc:
            self.metrics.rejected.labels(reason="deadline").inc()
            raise DeadlineExceeded(
                f"the request took longer than the server deadline of {self.request_timeout_s:g} s; "
                "its engine work was cancelled"
            ) from exc
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.pending_calls[task] -= calls
