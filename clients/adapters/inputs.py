"""What the adapters take from a host's batch: prompt texts and one image per item."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def prompt_text(prompt: Any) -> str:
    """A prompt's text: the string itself, or the last text of chat messages."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [part.get("text", "") for part in content or [] if part.get("type") == "text"]
        if texts:
            return " ".join(texts)
    raise ValueError("no text found in the prompt")


def one_image_each(values: Sequence[Any], n: int, what: str, allow_paths: bool) -> list[Any]:
    """One image per item: one-element lists flattened, text (a path) refused unless `allow_paths`."""
    if len(values) != n:
        raise ValueError(f"{what}: expected one per item ({n}), got {len(values)}")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, list | tuple):
            if len(value) != 1:
                raise ValueError(f"{what}[{i}]: expected one image, got a list of {len(value)}")
            value = value[0]
        if value is None:
            raise ValueError(f"{what}[{i}] is None")
        if not allow_paths and isinstance(value, str | Path):
            raise TypeError(
                f"{what}[{i}] is text; give a PIL image, an array, a tensor or encoded bytes (text is never opened)"
            )
        out.append(value)
    return out
