"""A small OpenAI-compatible chat client for the curation steps: bounded concurrency, retries, usage.

Each step of a pipeline has its own endpoint, model and key (`Endpoint`). Calls that fail in a
way a later attempt may not (connection, timeout and protocol errors, a body that does not
decode, 408/409/425/429/5xx) are retried with exponential backoff and jitter, honouring
`Retry-After`; anything else fails at once. A call that fails for good raises ChatError, which
fails its item only. Every call's token usage is added up per step for the summary.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from clients.retry import RETRY_STATUS, RetryPolicy, retry_after
from server.images import fit_to_budget

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ChatError(RuntimeError):
    """A chat call that failed for good (after its retries, or at once for a non-retryable answer)."""


@dataclass(frozen=True)
class Endpoint:
    """Where one pipeline step sends its calls."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 1024


@dataclass
class Usage:
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def image_data_url(path: Path, pixel_budget: int | None = None) -> str:
    """A data URL of an image file: its own bytes when small enough, else a downscaled PNG."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        image_format = image.format or ""
        too_big = pixel_budget is not None and image.width * image.height > pixel_budget
        if image_format in _MIME and not too_big:
            return f"data:{_MIME[image_format]};base64,{base64.b64encode(raw).decode('ascii')}"
        image.load()
        converted = image.convert("RGB")
    if pixel_budget is not None:
        converted = fit_to_budget(converted, pixel_budget)
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def user_turn(text: str, image_urls: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One user message: the images first, then the text."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@dataclass
class ChatClient:
    """Calls one endpoint over at most `concurrency` connections (the runner's worker count bounds the calls)."""

    endpoint: Endpoint
    concurrency: int = 8
    timeout_s: float = 300.0
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(backoff_s=1.0))
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.endpoint.api_key}"} if self.endpoint.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(30.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, messages: list[dict[str, Any]]) -> str:
        """The assistant's text for `messages`; raises ChatError when every attempt failed."""
        body = {
            "model": self.endpoint.model,
            "messages": messages,
            "temperature": self.endpoint.temperature,
            "max_tokens": self.endpoint.max_tokens,
        }
        for attempt in range(self.retry.max_attempts):
            last = attempt == self.retry.max_attempts - 1
            try:
                response = await self._http.post("/chat/completions", json=body)
            except httpx.HTTPError as exc:  # connection, timeout, protocol, undecodable body
                if last:
                    raise ChatError(f"{self.endpoint.model}: {type(exc).__name__}: {exc}") from exc
                await self._back_off(attempt, None)
                continue
            if response.status_code in RETRY_STATUS and not last:
                await self._back_off(attempt, retry_after(response.headers))
                continue
            return self._text(response)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def _back_off(self, attempt: int, asked: float | None) -> None:
        self.usage.retries += 1
        await asyncio.sleep(self.retry.delay(attempt, asked))

    def _text(self, response: httpx.Response) -> str:
        if response.status_code != 200:
            raise ChatError(f"{self.endpoint.model}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            payload = response.json()
            message = payload["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ChatError(f"{self.endpoint.model}: not a chat completion: {response.text[:300]}") from exc
        usage = payload.get("usage") or {}
        self.usage.calls += 1
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise ChatError(
                f"{self.endpoint.model}: empty answer (finish_reason {payload['choices'][0].get('finish_reason')})"
            )
        return text
