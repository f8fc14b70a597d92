"""Answer a retried request (same X-Request-ID on the same route) with its first answer.

A retry that arrives while the first attempt still runs waits for it instead of scoring again; if
the first attempt is abandoned (its caller disconnected), the retry scores the request itself.
Answers are kept for `window_s` seconds, at most `max_entries` of them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any


class RecentAnswers:
    def __init__(self, window_s: float, max_entries: int = 2048) -> None:
        self.window_s, self.max_entries = window_s, max_entries
        self._answers: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()
        self._running: dict[str, asyncio.Future[Any]] = {}

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.window_s
        while self._answers and (
            len(self._answers) > self.max_entries or next(iter(self._answers.values()))[0] < cutoff
        ):
            self._answers.popitem(last=False)

    async def once(self, key: str | None, compute: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """(answer, replayed): the stored answer for `key` if there is one, else `compute()`'s."""
        if key is None or not self.enabled:
            return await compute(), False
        self._expire()
        if key in self._answers:
            return self._answers[key][1], True
        if key in self._running:
            running = self._running[key]
            try:
                return await asyncio.shield(running), True
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request itself was cancelled
            return await self.once(key, compute)  # the first attempt was abandoned (its caller left): score here
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            answer = await compute()
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # a retry that never comes must not leave an unretrieved exception
            raise
        except BaseException:
            future.cancel()  # abandoned, not failed: a retry waiting for it scores the request itself
            raise
        finally:
            self._running.pop(key, None)
        future.set_result(answer)
        self._answers[key] = (time.monotonic(), answer)
        return answer, False
