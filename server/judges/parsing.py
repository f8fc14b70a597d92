"""Parsers for the answers the FIRM critics write, in the formats they were trained on.

Each parser accepts what the public release's reward servers accept, tried in the same order,
so a released checkpoint is scored here as it is there:

- edit judges: `{"reasoning" : "...", "score" : [N]}` (also fenced, or cut off after the score);
- instruction following: `\\boxed{N}` (also `\\boxed{[N]}`, doubled braces), then
  `Final Alignment Rating: N`, then a JSON `score`, then `Final Score: N`;
- quality: `{"score" : [s1, s2, s3], "reasoning" : "..."}`, then a bare `[s1, s2, s3]`.

Where this differs by design: an answer with no valid score raises ParseError (the release
scores it 0), and a fractional score is refused rather than truncated. Each score keeps the
character offset of its digit so the engine's probabilities there give the expected score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

SCORE_MIN = 1
SCORE_MAX = 5
QUALITY_KEYS = ("aesthetics", "technical_quality", "structure_texture")  # the order of the released list


class ParseError(ValueError):
    """The judge's answer holds no valid score."""


@dataclass(frozen=True)
class ScoreMatch:
    value: int
    offset: int | None  # index in the answer of the digit whose probabilities give the expected score


@dataclass(frozen=True)
class ParsedAnswer:
    scores: dict[str, ScoreMatch]
    reasoning: str | None = None


_DIGIT = r"(?P<num>[1-5])(?!\d|\.0*[1-9])"  # a whole score (4 or 4.0): not the first digit of 10 or 3.5
_OPEN, _CLOSE = r"(?:\[\s*)?", r"(?:\s*\])?"
_BOXED = re.compile(r"\\boxed\{+\s*" + _OPEN + _DIGIT + _CLOSE + r"\s*\}+")
_RATING = re.compile(r"Final Alignment Rating\s*:\s*" + _OPEN + _DIGIT + _CLOSE)
_FINAL_SCORE = re.compile(r"Final Score\s*:\s*" + _OPEN + _DIGIT + _CLOSE)
_SCORE_KEY = re.compile(r'"score"\s*:\s*\[?\s*"?' + _DIGIT)
_ANALYSIS = re.compile(r"\*\*Final Analysis\*\*:\s*(.*?)(?:\n\*\*Final Alignment Rating|\Z)", re.DOTALL)
_REASONING = re.compile(r'"reasoning"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ITEM = r'\s*"?([1-5](?:\.\d+)?)"?\s*'
_SCORE_LIST = re.compile(r'"score"\s*:\s*\[' + _ITEM + "," + _ITEM + "," + _ITEM + r"\]")
_BARE_LIST = re.compile(r"\[" + _ITEM + "," + _ITEM + "," + _ITEM + r"\]")


def _json_object(text: str) -> dict | None:
    """The JSON object from the first '{' to the last '}', as the release reads it."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        found = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def _whole(value: object, what: str) -> int | None:
    """A 1-5 score from a JSON value (4, 4.0, "4", [4]); None when there is none; ParseError when the
    value is a number that is not a whole 1-5 score."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).isdigit():
        value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not float(value).is_integer():
        raise ParseError(f"{what} must be a whole number from {SCORE_MIN} to {SCORE_MAX}, got {value}")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise ParseError(f"{what} must be from {SCORE_MIN} to {SCORE_MAX}, got {value:g}")
    return int(value)


def _match(found: re.Match[str]) -> ScoreMatch:
    return ScoreMatch(value=int(found.group("num")), offset=found.start("num"))


def _json_score(text: str) -> tuple[ScoreMatch | None, str | None]:
    """The `score` of the answer's JSON object (with its digit's offset), or of its first `"score":`."""
    payload = _json_object(text)
    reasoning = None
    if payload is not None:
        if isinstance(payload.get("reasoning"), str):
            reasoning = payload["reasoning"]
        value = _whole(payload.get("score"), "score")
        if value is not None:
            offsets = [m.start("num") for m in _SCORE_KEY.finditer(text) if int(m.group("num")) == value]
            return ScoreMatch(value, offsets[-1] if offsets else None), reasoning
    found = _SCORE_KEY.search(text)  # a cut-off or broken object that already holds its score
    if found is None:
        return None, reasoning
    if reasoning is None and (said := _REASONING.search(text)) is not None:
        try:
            reasoning = json.loads(f'"{said.group(1)}"')
        except json.JSONDecodeError:
            reasoning = said.group(1)
    return _match(found), reasoning


def parse_json_score(text: str) -> ParsedAnswer:
    """Parse the edit judges' `{"reasoning" : "...", "score" : [N]}`.

    >>> parse_json_score('```json\\n{"reasoning" : "Done.", "score" : [4]}\\n```').scores["score"].value
    4
    >>> parse_json_score('{"reasoning" : "The hat is red", "score" : [2').scores["score"].value
    2
    """
    score, reasoning = _json_score(text)
    if score is None:
        raise ParseError('no score found in the answer (expected {"reasoning" : "...", "score" : [N]})')
    return ParsedAnswer(scores={"score": score}, reasoning=reasoning)


def parse_alignment_rating(text: str) -> ParsedAnswer:
    """Parse the instruction-following analysis: the box, else the rating line, else a JSON score, else
    `Final Score: N`. Its reasoning is the `**Final Analysis**:` paragraph. The probabilities that give
    the expected score are read where the rating was first committed: the rating line when there is
    one that agrees with the box, else the digit that was parsed.

    >>> a = parse_alignment_rating("**Final Analysis**: Red.\\n**Final Alignment Rating: 4**\\n\\\\boxed{[4]}")
    >>> a.scores["score"].value, a.reasoning
    (4, 'Red.')
    >>> parse_alignment_rating("1. **Colour**: red.\\n**Final Alignment Rating: 3**").scores["score"].value
    3
    """
    rating = _RATING.search(text)
    found = _BOXED.search(text) or rating
    if found is not None:
        analysis = _ANALYSIS.search(text)
        reasoning = analysis.group(1).strip() if analysis else None
        # the rating line commits the score first; its probabilities stand for the box's only when they agree
        agrees = rating is not None and rating.group("num") == found.group("num")
        score = ScoreMatch(value=int(found.group("num")), offset=(rating if agrees else found).start("num"))
    else:
        score, reasoning = _json_score(text)
        if score is None and (final := _FINAL_SCORE.search(text)) is not None:
            score = _match(final)
    if score is None:
        raise ParseError("no rating found in the answer (expected **Final Alignment Rating: N** and \\boxed{N})")
    return ParsedAnswer(scores={"score": score}, reasoning=reasoning or None)


def _subscores(values: Sequence[object]) -> list[int] | None:
    if len(values) < len(QUALITY_KEYS):
        return None
    found = [_whole(v, key) for v, key in zip(values, QUALITY_KEYS, strict=False)]
    return None if None in found else found  # type: ignore[return-value]


def parse_quality_scores(text: str) -> ParsedAnswer:
    """Parse `{"score" : [s1, s2, s3], "reasoning" : "..."}` (aesthetics, technical quality, structure &
    texture), falling back to a bare `[s1, s2, s3]`; quality is their minimum.

    >>> a = parse_quality_scores('{\\n  "score" : [4, 3, 5],\\n  "reasoning" : "Clean."\\n}')
    >>> {k: v.value for k, v in a.scores.items()}, a.reasoning
    ({'aesthetics': 4, 'technical_quality': 3, 'structure_texture': 5}, 'Clean.')
    """
    payload = _json_object(text)
    reasoning = payload.get("reasoning") if payload is not None else None
    listed = _SCORE_LIST.search(text) or _BARE_LIST.search(text)
    values = None
    if payload is not None and isinstance(payload.get("score"), list):
        values = _subscores(payload["score"])
    offsets: list[int | None] = [None] * len(QUALITY_KEYS)
    if listed is not None:
        from_list = _subscores(listed.groups())
        if values is None:
            values = from_list
        if from_list == values:
            offsets = [listed.start(i + 1) for i in range(len(QUALITY_KEYS))]
    if values is None:
        raise ParseError('no quality scores found in the answer (expected "score" : [s1, s2, s3])')
    scores = {key: ScoreMatch(v, o) for key, v, o in zip(QUALITY_KEYS, values, offsets, strict=True)}
    return ParsedAnswer(scores=scores, reasoning=reasoning if isinstance(reasoning, str) else None)
