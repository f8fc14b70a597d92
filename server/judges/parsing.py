"""Parsers for what the critics write.

Tolerant of the shapes models really produce (code fences, prose around the JSON, a score as
4, "4", [4] or ["4"]), strict about meaning: a score outside 1-5, a fractional score, or no
score at all raises ParseError. Each parsed score keeps the character offset of its digit so
the engine's token probabilities at that position can be looked up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SCORE_MIN = 1
SCORE_MAX = 5


class ParseError(ValueError):
    """The judge's answer holds no valid score."""


@dataclass(frozen=True)
class ScoreMatch:
    value: int
    offset: int  # index in the answer text of the score's first character


@dataclass(frozen=True)
class ParsedAnswer:
    scores: dict[str, ScoreMatch]
    reasoning: str | None = None


_NUMBER = r"(?P<num>-?\d+(?:\.\d+)?)"


def _key_pattern(key: str) -> re.Pattern[str]:
    # "score": [4] | 'score': "4" | score = 4 | "score": ["4"]
    return re.compile(
        rf"""(?<![A-Za-z_])["']?{key}["']?\s*[:=]\s*\[?\s*["']?{_NUMBER}["']?\s*\]?""",
        re.IGNORECASE,
    )


_BOXED = re.compile(r"\\boxed\s*\{\s*" + _NUMBER + r"\s*\}")
_BARE = re.compile(r"^\s*\[?\s*[\"']?" + _NUMBER + r"[\"']?\s*\]?\s*$")
_REASONING = re.compile(r"""["']reasoning["']\s*:\s*"((?:[^"\\]|\\.)*)\"""", re.DOTALL)


def _checked(text: str, match: re.Match[str], what: str) -> ScoreMatch:
    raw = match.group("num")
    try:
        number = float(raw)
    except ValueError as exc:  # pragma: no cover - the pattern only admits numbers
        raise ParseError(f"{what} is not a number: {raw!r}") from exc
    if not number.is_integer():
        raise ParseError(f"{what} must be a whole number from {SCORE_MIN} to {SCORE_MAX}, got {raw}")
    value = int(number)
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise ParseError(f"{what} must be from {SCORE_MIN} to {SCORE_MAX}, got {raw}")
    return ScoreMatch(value=value, offset=match.start("num"))


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - we want the last one
        pass
    return found


def _reasoning(text: str) -> str | None:
    found = _REASONING.search(text)
    if found is None:
        return None
    try:
        return json.loads(f'"{found.group(1)}"')
    except json.JSONDecodeError:
        return found.group(1)


def parse_json_score(text: str) -> ParsedAnswer:
    """Parse `{"reasoning": "...", "score": [N]}` and the variants models write.

    >>> parse_json_score('```json\\n{"reasoning": "Done.", "score": [4]}\\n```').scores["score"].value
    4
    """
    found = _last(_key_pattern("score"), text)
    if found is None:
        found = _BARE.match(text)
    if found is None:
        raise ParseError("no score found in the answer")
    return ParsedAnswer(scores={"score": _checked(text, found, "score")}, reasoning=_reasoning(text))


def parse_boxed_score(text: str) -> ParsedAnswer:
    """Parse an analysis that ends with the rating in \\boxed{N}; the last box counts.

    >>> parse_boxed_score("The cat is red. \\\\boxed{5}").scores["score"].value
    5
    """
    found = _last(_BOXED, text)
    if found is None:
        raise ParseError("no \\boxed{N} rating found in the answer")
    reasoning = text[: found.start()].strip() or None
    return ParsedAnswer(scores={"score": _checked(text, found, "boxed rating")}, reasoning=reasoning)


QUALITY_KEYS = ("aesthetics", "technical_quality", "structure_texture")


def parse_quality_scores(text: str) -> ParsedAnswer:
    """Parse three 1-5 subscores; quality is their minimum.

    >>> a = parse_quality_scores('{"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}')
    >>> {k: v.value for k, v in a.scores.items()}
    {'aesthetics': 4, 'technical_quality': 3, 'structure_texture': 5}
    """
    scores: dict[str, ScoreMatch] = {}
    for key in QUALITY_KEYS:
        found = _last(_key_pattern(key), text)
        if found is None:
            raise ParseError(f"no {key} subscore found in the answer")
        scores[key] = _checked(text, found, key)
    return ParsedAnswer(scores=scores, reasoning=_reasoning(text))
