"""Compute identical judge calls once: within a request, across concurrent requests, and from an LRU cache.

Two calls are identical when the model and its revision, the judge, the prompt text and the
decoded pixels of every image are the same. Greedy decoding makes the answer a function of
exactly that, so sharing it changes no score. Only successful answers are cached.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from server.batching import Outcome, Runner
from server.engines.base import GenerationRequest, GenerationResult, PromptPart
from server.images import DIGEST_KEY


def image_digest(image: Image.Image) -> str:
    """The digest of the bytes the image was decoded from, or else of its pixels."""
    if DIGEST_KEY in image.info:
        return image.info[DIGEST_KEY]
    shape = f"{image.mode}{image.size}".encode()[:16]
    return hashlib.blake2b(image.tobytes(), digest_size=16, person=shape).hexdigest()


def call_key(model: str, revision: str | None, judge: str, parts: Sequence[PromptPart], digests: dict[int, str]) -> str:
    """Identity of a judge call; `digests` remembers image digests by object for the request."""
    h = hashlib.sha256(f"{model}\0{revision}\0{judge}".encode())
    for part in parts:
        if isinstance(part, Image.Image):
            if id(part) not in digests:
                digests[id(part)] = image_digest(part)
            h.update(b"\0img\0" + digests[id(part)].encode())
        else:
            h.update(b"\0txt\0" + part.encode())
    return h.hexdigest()


@dataclass(eq=False)
class _SharedCall:
    """An engine call in progress and how many requests still wait for it."""

    future: asyncio.Future[Outcome]
    waiters: int = 1


class CallSharing:
    """The cache, and the calls in progress that a new identical call joins instead of running again.

    A call in progress is cancelled only when the last request waiting for it has gone (deadline or
    disconnect), so the request that started it can leave without failing the others."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, GenerationResult] = collections.OrderedDict()
        self._running: dict[str, _SharedCall] = {}

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _get(self, key: str) -> GenerationResult | None:
        result = self._cache.get(key)
        if result is not None:
            self._cache.move_to_end(key)
        return result

    def _put(self, key: str, result: GenerationResult) -> None:
        self._cache[key] = result
        self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def _join(self, key: str) -> _SharedCall | None:
        call = self._running.get(key)
        if call is None or call.future.done():  # a finished or abandoned call is not joined
            return None
        call.waiters += 1
        return call

    def _finished(self, key: str, call: _SharedCall, future: asyncio.Future[Outcome]) -> None:
        if self._running.get(key) is call:
            del self._running[key]
        if not future.cancelled() and isinstance(result := future.result(), GenerationResult):
            self._put(key, result)

    def _leave(self, key: str, call: _SharedCall) -> None:
        call.waiters -= 1
        if call.waiters == 0 and not call.future.done():
            if self._running.get(key) is call:
                del self._running[key]
            call.future.cancel()  # no one waits for it any more: the runner drops or stops it

    async def run(
        self,
        runner: Runner,
        requests: Sequence[GenerationRequest],
        keys: Sequence[str],
        hit: Callable[[int], None],
        deadline: float | None = None,
    ) -> list[Outcome]:
        """Outcomes for `requests`, computing each distinct key once; `hit(n)` counts the calls spared.
        A call not finished by `deadline` (the event loop's clock) is left, and its outcome is
        `DeadlineMissed`; the engine call stops unless another request still waits for it."""
        if not self.enabled:
            if deadline is None:
                return await runner.submit(requests)
            return await _until(runner.launch(requests), deadline)
        known: dict[str, Outcome] = {}
        waiting: dict[str, _SharedCall] = {}
        new: dict[str, GenerationRequest] = {}
        hits = 0
        for key, request in zip(keys, requests, strict=True):
            if key in known or key in waiting or key in new:
                hits += 1
            elif (cached := self._get(key)) is not None:
                known[key], hits = cached, hits + 1
            elif (call := self._join(key)) is not None:
                waiting[key], hits = call, hits + 1
            else:
                new[key] = request
        if hits:
            hit(hits)
        futures = runner.launch(list(new.values())) if new else []
        for key, future in zip(new, futures, strict=True):
            self._running[key] = waiting[key] = _SharedCall(future)
            future.add_done_callback(functools.partial(self._finished, key, waiting[key]))
        done: set[asyncio.Future[Outcome]] = set()
        try:
            if waiting:
                done, _ = await asyncio.wait([call.future for call in waiting.values()], timeout=_left(deadline))
        finally:
            for key, call in waiting.items():
                self._leave(key, call)
        known.update(
            (key, call.future.result() if call.future in done else DeadlineMissed()) for key, call in waiting.items()
        )
        return [known[key] for key in keys]


class DeadlineMissed(Exception):
    """The caller's deadline passed before this call finished; its work was dropped."""

    def __init__(self) -> None:
        super().__init__("the caller's deadline (timeout_s) passed before this item's judge calls finished")


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` on the event loop's clock (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())


async def _until(futures: list[asyncio.Future[Outcome]], deadline: float) -> list[Outcome]:
    """The futures' outcomes, `DeadlineMissed` for those not done by `deadline` (they are abandoned)."""
    if not futures:
        return []
    try:
        done, pending = await asyncio.wait(futures, timeout=_left(deadline))
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise
    for future in pending:
        future.cancel()
    return [future.result() if future in done else DeadlineMissed() for future in futures]
