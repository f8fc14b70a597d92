"""Shared by the engines that hold a tokenizer: chat content, watched-token ids and steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from server.engines.base import EngineError, PromptPart, WatchedStep


def chat_content(parts: Sequence[PromptPart]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """One user turn in the Hugging Face chat format: image placeholders in place, and the images."""
    content: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for part in parts:
        if isinstance(part, Image.Image):
            content.append({"type": "image"})
            images.append(part)
        else:
            content.append({"type": "text", "text": part})
    return content, images


def single_token_ids(tokenizer: Any, tokens: Sequence[str], model: str) -> list[int]:
    """The id of each watched token, which must be one token on its own (Qwen splits digits)."""
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise EngineError(f"watched token {token!r} is not a single token for {model}")
        ids.append(encoded[0])
    return ids


def watched_steps(
    tokenizer: Any,
    ids: Sequence[int],
    watch_ids: Sequence[int],
    watch_tokens: Sequence[str],
    probs_at: Callable[[int], Sequence[float]],
) -> tuple[WatchedStep, ...]:
    """A WatchedStep for each generated watched token; `probs_at(step)` gives the watched tokens' probabilities."""
    steps = []
    for step, token_id in enumerate(ids):
        if token_id in watch_ids:
            offset = len(tokenizer.decode(list(ids[:step]), skip_special_tokens=True))
            steps.append(
                WatchedStep(
                    offset=offset,
                    token=watch_tokens[list(watch_ids).index(token_id)],
                    probs=dict(zip(watch_tokens, probs_at(step), strict=True)),
                )
            )
    return tuple(steps)
