"""Reading the teacher models' replies: JSON objects, possibly fenced or wrapped in prose.

A reply that does not hold what was asked for raises ReplyError; the item then fails visibly
and is tried again on the next run. Nothing is guessed.

    >>> extract_json('Sure:\\n```json\\n{"score": 4}\\n```')
    {'score': 4}
    >>> grade_of({"score": 4, "reasoning": "Red now."}, "execution")
    ('Red now.', 4)
"""

from __future__ import annotations

import json
from typing import Any


class ReplyError(ValueError):
    """A teacher reply without the fields the pipeline asked for."""


def extract_json(text: str) -> dict[str, Any]:
    """The JSON object in a reply: the whole text, or from its first '{' to its last '}'."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ReplyError(f"no JSON object in the reply: {text[:200]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ReplyError(f"the reply's JSON does not parse ({exc}): {text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise ReplyError("the reply's JSON is not an object")
    return value


def score_of(value: Any, what: str) -> int:
    """A whole 1-5 score, written as 4, "4" or [4]."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise ReplyError(f"{what}: the score must be a whole number from 1 to 5, got {value!r}")
    return value


def text_of(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReplyError(f"{what}: expected a non-empty text, got {value!r}")
    return " ".join(value.split())


def grade_of(value: Any, what: str) -> tuple[str, int]:
    """(reasoning, score) of one graded dimension."""
    if not isinstance(value, dict):
        raise ReplyError(f"{what}: expected an object with reasoning and score, got {value!r}")
    return text_of(value.get("reasoning"), f"{what}.reasoning"), score_of(value.get("score"), f"{what}.score")
