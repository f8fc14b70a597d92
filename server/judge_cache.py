"""Compute identical judge calls once: within a request, across concurrent requests, and from an LRU cache.

Two calls are identical when the model and its revision, the judge, the prompt text and the
decoded pixels of every image are the same. Greedy decoding makes the answer a function of
exactly that, so sharing it changes no score. Only successful answers are cached.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable, Sequence

from PIL import Image

from server.batching import Outcome, Runner
from server.engines.base import EngineError, GenerationRequest, GenerationResult, PromptPart
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


class CallSharing:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, GenerationResult] = collections.OrderedDict()
        self._running: dict[str, asyncio.Future[Outcome]] = {}

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

    async def run(
        self,
        runner: Runner,
        requests: Sequence[GenerationRequest],
        keys: Sequence[str],
        hit: Callable[[int], None],
    ) -> list[Outcome]:
        """Outcomes for `requests`, computing each distinct key once; `hit(n)` counts the calls spared."""
        if not self.enabled:
            return await runner.submit(requests) if requests else []
        known: dict[str, Outcome] = {}
        shared: dict[str, asyncio.Future[Outcome]] = {}
        new: dict[str, GenerationRequest] = {}
        hits = 0
        for key, request in zip(keys, requests, strict=True):
            if key in known or key in shared or key in new:
                hits += 1
            elif (cached := self._get(key)) is not None:
                known[key], hits = cached, hits + 1
            elif key in self._running:
                shared[key], hits = self._running[key], hits + 1
            else:
                new[key] = request
        if hits:
            hit(hits)
        loop = asyncio.get_running_loop()
        for key in new:
            self._running[key] = loop.create_future()
        try:
            outcomes = await runner.submit(list(new.values())) if new else []
            for key, outcome in zip(new, outcomes, strict=True):
                known[key] = outcome
                self._running[key].set_result(outcome)
                if isinstance(outcome, GenerationResult):
                    self._put(key, outcome)
        finally:
            for key in new:
                future = self._running.pop(key)
                if not future.done():  # this request was cancelled: whoever shared the call learns why
                    future.set_result(EngineError("the identical call this one waited for was cancelled"))
        for key, future in shared.items():
            known[key] = await asyncio.shield(future)
        return [known[key] for key in keys]
