"""Engine on a remote OpenAI-compatible chat-completions server (`vllm serve`, SGLang).

The remote server batches by itself, so each judge call is sent as it comes. Images travel as
PNG data URLs in the prompt order of the judge; decoding is greedy with an explicit seed and
explicit neutral penalties (`vllm serve` would otherwise fill unset ones from the checkpoint's
generation config). The score-token probabilities come from `logprob_token_ids` where the server
has vLLM's `/tokenize` (the digits' ids are asked once at start), else from `top_logprobs`, which
misses a digit outside the top k. Calls are spread over several base URLs by least outstanding
requests; a URL that fails or times out cools down while the call is retried on another, a
bounded number of times.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from PIL import Image

from clients.retry import RETRY_STATUS, RetryPolicy
from server.engines.base import Engine, EngineError, GenerationRequest, GenerationResult, WatchedStep

log = logging.getLogger(__name__)

COOLDOWN_S = 5.0
NEUTRAL_PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
BACKOFF = RetryPolicy(backoff_s=0.1, max_backoff_s=2.0)  # between attempts at a remote call


class _Retryable(Exception):
    """This attempt failed in a way another attempt (or another URL) may not."""


@dataclass
class _Endpoint:
    url: str
    outstanding: int = 0
    cooling_until: float = 0.0


def _token_offsets(text: str, entries: Sequence[dict[str, Any]]) -> list[int | None]:
    """Where each log-prob entry's token starts in `text`; None where that can't be known.

    Summing token lengths is wrong when a character spans several tokens: the server shows each
    piece as U+FFFD (or as raw bytes). The exact UTF-8 bytes give the offsets when the server sends
    them; otherwise tokens are aligned to the text, and a run of pieces of a split character is
    skipped up to where the next whole token resumes.
    """
    raw = [e.get("bytes") for e in entries]
    if raw and all(isinstance(b, list) for b in raw) and b"".join(bytes(b) for b in raw) == text.encode():
        offsets, prefix = [], b""
        for b in raw:
            offsets.append(len(prefix.decode("utf-8", errors="ignore")))
            prefix += bytes(b)
        return offsets
    offsets, pos, split = [], 0, False  # split: inside the pieces of a character split over tokens
    for entry in entries:
        token = entry["token"]
        if not split and text.startswith(token, pos):
            offsets.append(pos)
            pos += len(token)
        elif split and "\ufffd" not in token and token and (found := text.find(token, pos + 1)) >= 0:
            offsets.append(found)  # the first whole token after the pieces
            pos, split = found + len(token), False
        elif "\ufffd" in token or token.startswith("bytes:"):
            offsets.append(None)
            split = True
        else:  # the text and the tokens disagree: no later offset can be trusted
            return offsets + [None] * (len(entries) - len(offsets))
    return offsets


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; a fast level, sent over a local network
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIEngine(Engine):
    batches_itself: ClassVar[bool] = True
    supports_constraints: ClassVar[bool] = True
    # The remote server batches as it likes; `vllm serve` started with VLLM_BATCH_INVARIANT=1 is, on its own.
    supports_batch_invariance: ClassVar[bool] = False
    name: ClassVar[str] = "openai"

    def __init__(
        self,
        model: str,
        watch_tokens: Sequence[str],
        *,
        revision: str | None = None,
        base_urls: Sequence[str] = (),
        api_key: str | None = None,
        served_model: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        max_connections: int = 64,
        seed: int = 0,
        top_logprobs: int = 20,
        **options: Any,
    ) -> None:
        super().__init__(model, watch_tokens, revision=revision, **options)
        if not base_urls:
            raise ValueError("the openai engine needs at least one base URL (--openai-base-urls)")
        self.endpoints = [_Endpoint(url.rstrip("/")) for url in base_urls]
        self.served_model = served_model or model
        self.api_key = api_key
        self.timeout_s, self.max_retries, self.max_connections = timeout_s, max_retries, max_connections
        self.seed, self.top_logprobs = seed, top_logprobs
        self._client: httpx.AsyncClient | None = None
        self.watch_ids: list[int] = []  # the digits' token ids, where the server can tell them

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
        )
        for endpoint in self.endpoints:
            try:
                response = await self._client.get(f"{endpoint.url}/models", timeout=5.0)
                log.info("openai endpoint %s answers /models with %d", endpoint.url, response.status_code)
            except httpx.HTTPError as exc:
                log.warning("openai endpoint %s is not reachable yet: %s", endpoint.url, exc)
        self.watch_ids = await self._watch_token_ids()

    async def _watch_token_ids(self) -> list[int]:
        """The watched tokens' ids from vLLM's `/tokenize`, or [] (then `top_logprobs` alone) where
        the first server has no such route or a watched token is not a single token."""
        assert self._client is not None
        root = self.endpoints[0].url.removesuffix("/v1")
        ids = []
        try:
            for token in self.watch_tokens:
                body = {"model": self.served_model, "prompt": token, "add_special_tokens": False}
                response = await self._client.post(f"{root}/tokenize", json=body, timeout=5.0)
                data = response.json() if response.status_code == 200 else None
                tokens = data.get("tokens") if isinstance(data, dict) else None
                if not (isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], int)):
                    raise ValueError(f"/tokenize answered {response.status_code} for {token!r}")
                ids.append(tokens[0])
        except (httpx.HTTPError, ValueError) as exc:
            log.info("score-token probabilities from top_logprobs=%d (%s)", self.top_logprobs, exc)
            return []
        log.info("score-token probabilities from logprob_token_ids %s", ids)
        return ids

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | EngineError]:
        if self._client is None:
            raise EngineError("engine is not started")
        urls: dict[int, str] = {}  # a group's shared source image is encoded once

        def data_url(image: Image.Image) -> str:
            if id(image) not in urls:
                urls[id(image)] = _data_url(image)
            return urls[id(image)]

        # PNG encoding is CPU work: off the event loop, which keeps answering other requests meanwhile
        bodies = await asyncio.to_thread(lambda: [self._body(r, data_url) for r in requests])
        return list(await asyncio.gather(*(self._call(body) for body in bodies)))

    def _body(self, request: GenerationRequest, data_url: Any) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": data_url(part)}}
            if isinstance(part, Image.Image)
            else {"type": "text", "text": part}
            for part in request.parts
        ]
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "seed": self.seed,
            "max_completion_tokens": request.max_new_tokens,
            # unset penalties would come from the checkpoint's generation config on `vllm serve`
            **NEUTRAL_PENALTIES,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.watch_ids:
            body["logprob_token_ids"] = self.watch_ids  # every digit, even those outside the top k
        if request.constraint is not None:
            c = request.constraint
            body["structured_outputs"] = {"json": c.json_schema} if c.json_schema is not None else {"regex": c.regex}
        return body

    def _pick(self) -> _Endpoint:
        now = time.monotonic()
        ready = [e for e in self.endpoints if e.cooling_until <= now] or sorted(
            self.endpoints, key=lambda e: e.cooling_until
        )[:1]
        return min(ready, key=lambda e: e.outstanding)

    async def _call(self, body: dict[str, Any]) -> GenerationResult | EngineError:
        problems = []
        for attempt in range(self.max_retries + 1):
            endpoint = self._pick()
            endpoint.outstanding += 1
            try:
                return await self._attempt(endpoint, body)
            except _Retryable as exc:
                problems.append(f"{endpoint.url}: {exc}")
                endpoint.cooling_until = time.monotonic() + COOLDOWN_S
                if attempt < self.max_retries:
                    await asyncio.sleep(BACKOFF.delay(attempt))
            except EngineError as exc:
                return exc
            finally:
                endpoint.outstanding -= 1
        return EngineError(f"{len(problems)} attempts failed: " + "; ".join(problems))

    async def _attempt(self, endpoint: _Endpoint, body: dict[str, Any]) -> GenerationResult:
        assert self._client is not None
        try:
            response = await self._client.post(f"{endpoint.url}/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise EngineError(f"{endpoint.url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return self._result(response.json())
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EngineError(f"{endpoint.url} sent a malformed completion: {exc}") from exc

    def _result(self, completion: dict[str, Any]) -> GenerationResult:
        choice = completion["choices"][0]
        text = choice["message"]["content"] or ""
        entries = (choice.get("logprobs") or {}).get("content") or []
        watched = []
        for entry, offset in zip(entries, _token_offsets(text, entries), strict=True):
            token = entry["token"]
            if token in self.watch_tokens and offset is not None:
                top = {t["token"]: math.exp(t["logprob"]) for t in entry.get("top_logprobs", [])}
                top.setdefault(token, math.exp(entry["logprob"]))
                probs = {w: top.get(w, 0.0) for w in self.watch_tokens}
                watched.append(WatchedStep(offset=offset, token=token, probs=probs))
        return GenerationResult(text=text, watched=tuple(watched), finished=choice.get("finish_reason") != "length")
