"""Parsers for the answers the FIRM critics write, in the formats they were trained on.

Each parser reads what the public release's reward servers read, in the same order and the same
forms, so a released checkpoint is scored here as it is there:

- edit judges: the JSON object's `score` (`N`, `[N]`, `"N"`; a list gives its first entry), else the
  first `"score": N` or `"score": [N` anywhere (so an answer cut off after its score still counts);
- instruction following: `\\boxed{N}` (also `\\boxed{[N]}`, doubled braces), else
  `Final Alignment Rating: N`, else the JSON object's `score`, else `Final Score: N`, else the first
  `"score": N`;
- quality: the first three entries of the JSON object's `score` list, else the first
  `"score": [s1, s2, s3]`, else the first bare `[s1, s2, s3]` (outside JSON: single digits only).

The JSON object is the text from the first `{` to the last `}`. A JSON score outside 1-5 is passed
over for the next form, as the release passes it over.

Where this differs by design: an answer with no readable score raises ParseError (the release
scores it 0), and so does an answer the release reads only by truncating a number: a fractional or
out-of-range score (`3.5` read as 3, `10` as 1) or a JSON `true` (read as 1). Such a refusal names
what it refused. Each score keeps the character offset of its digit so the engine's probabilities
there give the expected score.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

SCORE_MIN = 1
SCORE_MAX = 5
QUALITY_KEYS = ("aesthetics", "technical_quality", "structure_texture")  # the order of the released list


class ParseError(ValueError):
    """The judge's answer holds no score the server accepts."""


@dataclass(frozen=True)
class ScoreMatch:
    value: int
    offset: int | None  # index in the answer of the digit whose probabilities give the expected score


@dataclass(frozen=True)
class ParsedAnswer:
    scores: dict[str, ScoreMatch]
    reasoning: str | None = None


# The forms the release reads, each finding the first digit of a score.
_NUM = r"(?P<num>[1-5])"
_OPEN = r"(?:\[\s*)?"
_BOXED = re.compile(r"\\boxed\{+\s*" + _OPEN + _NUM + r"(?:\s*\])?\s*\}+")
_RATING = re.compile(r"Final Alignment Rating\s*:\s*" + _OPEN + _NUM)
_FINAL_SCORE = re.compile(r"Final Score\s*:\s*" + _OPEN + _NUM)
_SCORE_KEY = re.compile(r'"score"\s*:\s*\[?\s*' + _NUM)
_TRIPLE = r"\[\s*([1-5])\s*,\s*([1-5])\s*,\s*([1-5])\s*\]"
_SCORE_TRIPLE = re.compile(r'"score"\s*:\s*' + _TRIPLE)
_BARE_TRIPLE = re.compile(_TRIPLE)
# The whole number written where a form found its digit: the release keeps only that digit.
_WRITTEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
# Where a JSON object's score is written, to find its digits' offsets.
_JSON_SCORE_AT = re.compile(r'"score"\s*:\s*\[?\s*"?\s*' + _NUM)
_ITEM_AT = r'\s*"?\s*([1-5])[^,\]]*'
_JSON_LIST_AT = re.compile(r'"score"\s*:\s*\[' + _ITEM_AT + "," + _ITEM_AT + "," + _ITEM_AT)
_ANALYSIS = re.compile(r"\*\*Final Analysis\*\*:\s*(.*?)(?:\n\*\*Final Alignment Rating|\Z)", re.DOTALL)
_REASONING = re.compile(r'"reasoning"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_RANGE = f"a score from {SCORE_MIN} to {SCORE_MAX}"


@dataclass(frozen=True)
class _JsonObject:
    payload: dict[str, Any]
    start: int  # the object's first and last character in the answer
    end: int

    @property
    def reasoning(self) -> str | None:
        said = self.payload.get("reasoning")
        return said if isinstance(said, str) else None


@dataclass(frozen=True)
class _JsonScore:
    """What the JSON object's `score` gave: a score, or a note on why it gave none."""

    score: ScoreMatch | None = None
    reasoning: str | None = None
    note: str | None = None


def _shown(value: object) -> str:
    """A JSON value as a message quotes it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_object(text: str) -> _JsonObject | None:
    """The JSON object from the first '{' to the last '}', as the release reads it."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        found = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    except RecursionError as exc:  # the release's server fails such an answer outright
        raise ParseError("the answer's JSON is nested too deeply to read") from exc
    return _JsonObject(found, start, end) if isinstance(found, dict) else None


def _check_whole(value: float, written: str) -> None:
    """Refuse a number the release would truncate into a score."""
    if not value.is_integer():
        raise ParseError(f"{written} is not a whole score")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise ParseError(f"{written} is not {_RANGE}")


def _written_at(text: str, found: re.Match[str]) -> ScoreMatch:
    """The score whose first digit a form found, refused when the number written there is more than that
    digit (`4.5`, `10`).

    >>> _written_at('"score": [4.0]', _SCORE_KEY.search('"score": [4.0]'))
    ScoreMatch(value=4, offset=10)
    """
    start = found.start("num")
    written = _WRITTEN.match(text, start)
    assert written is not None  # the form found a digit here
    _check_whole(float(written.group()), written.group())
    return ScoreMatch(int(found.group("num")), start)


def _json_offset(text: str, found: _JsonObject, value: int) -> int | None:
    """The digit of the object's `score`: the last one written that agrees (JSON keeps a repeated key's last)."""
    offsets = [m.start("num") for m in _JSON_SCORE_AT.finditer(text, found.start, found.end) if m["num"] == str(value)]
    return offsets[-1] if offsets else None


def _json_score(text: str) -> _JsonScore:
    """The JSON object's single `score`, read as the release reads it."""
    found = _json_object(text)
    if found is None:
        return _JsonScore()
    raw = found.payload.get("score")
    value = raw[0] if isinstance(raw, list) and raw else raw
    if isinstance(value, str):
        if not value.strip().isdigit():
            return _JsonScore(reasoning=found.reasoning, note=f"the score {_shown(value)} is not a whole number")
        try:
            value = int(value.strip())
        except ValueError as exc:  # a digit character int() can't read; the release's server fails the answer
            raise ParseError(f"the score {_shown(value)} is not a number") from exc
    if isinstance(value, bool):  # the release reads true as 1 and passes false over
        if value:
            raise ParseError("true is not a score")
        return _JsonScore(reasoning=found.reasoning, note="false is not a score")
    if isinstance(value, int | float):
        if SCORE_MIN <= value <= SCORE_MAX:
            _check_whole(float(value), _shown(value))
            return _JsonScore(ScoreMatch(int(value), _json_offset(text, found, int(value))), found.reasoning)
        return _JsonScore(reasoning=found.reasoning, note=f"{_shown(value)} is not {_RANGE}")
    note = None if raw is None else f"the score {_shown(raw)} is not a number"
    return _JsonScore(reasoning=found.reasoning, note=note)


def _loose_reasoning(text: str) -> str | None:
    """The `"reasoning"` string of an object that is cut off or is not valid JSON."""
    said = _REASONING.search(text)
    if said is None:
        return None
    try:
        return json.loads(f'"{said.group(1)}"')
    except json.JSONDecodeError:
        return said.group(1)


def parse_json_score(text: str) -> ParsedAnswer:
    """Parse the edit judges' `{"reasoning" : "...", "score" : [N]}`: the JSON object's score, else the
    first `"score": N`.

    >>> parse_json_score('```json\\n{"reasoning" : "Done.", "score" : [4]}\\n```').scores["score"].value
    4
    >>> parse_json_score('{"reasoning" : "The hat is red", "score" : [2').scores["score"].value
    2
    """
    read = _json_score(text)
    if read.score is not None:
        return ParsedAnswer(scores={"score": read.score}, reasoning=read.reasoning)
    found = _SCORE_KEY.search(text)
    if found is None:
        raise ParseError(read.note or 'no score found in the answer (expected {"reasoning" : "...", "score" : [N]})')
    return ParsedAnswer(scores={"score": _written_at(text, found)}, reasoning=read.reasoning or _loose_reasoning(text))


def _rating(text: str, boxed: re.Match[str] | None, rating: re.Match[str] | None) -> ParsedAnswer:
    """The box's score, else the rating line's. The probabilities are read where the rating was first
    committed: the rating line when it writes the box's score, else the digit that was parsed."""
    analysis = _ANALYSIS.search(text)
    reasoning = (analysis.group(1).strip() or None) if analysis else None
    if boxed is None:
        assert rating is not None
        return ParsedAnswer(scores={"score": _written_at(text, rating)}, reasoning=reasoning)
    value = int(boxed.group("num"))
    offset = boxed.start("num")
    if rating is not None and (written := _WRITTEN.match(text, rating.start("num"))) is not None:
        offset = rating.start("num") if float(written.group()) == value else offset
    return ParsedAnswer(scores={"score": ScoreMatch(value, offset)}, reasoning=reasoning)


def parse_alignment_rating(text: str) -> ParsedAnswer:
    """Parse the instruction-following analysis: the box, else the rating line, else the JSON object's
    score, else `Final Score: N`, else the first `"score": N`. With a box or a rating line, the reasoning
    is the `**Final Analysis**:` paragraph.

    >>> a = parse_alignment_rating("**Final Analysis**: Red.\\n**Final Alignment Rating: 4**\\n\\\\boxed{[4]}")
    >>> a.scores["score"].value, a.reasoning
    (4, 'Red.')
    >>> parse_alignment_rating("1. **Colour**: red.\\n**Final Alignment Rating: 3**").scores["score"].value
    3
    """
    boxed, rating = _BOXED.search(text), _RATING.search(text)
    if boxed is not None or rating is not None:
        return _rating(text, boxed, rating)
    read = _json_score(text)
    if read.score is not None:
        return ParsedAnswer(scores={"score": read.score}, reasoning=read.reasoning)
    found = _FINAL_SCORE.search(text) or _SCORE_KEY.search(text)
    if found is None:
        raise ParseError(
            read.note or "no rating found in the answer (expected **Final Alignment Rating: N** and \\boxed{N})"
        )
    return ParsedAnswer(scores={"score": _written_at(text, found)}, reasoning=read.reasoning or _loose_reasoning(text))


def _subscore(item: object, key: str) -> tuple[float | None, str | None]:
    """One entry of the JSON list as the release reads it (any float() reads, truncated into 1-5): the
    number, or None and a note on why the list is passed over."""
    try:
        number = float(item)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"{key} {_shown(item)} is not a number"
    except OverflowError as exc:  # the release's server fails such an answer outright
        raise ParseError(f"{key} {_shown(item)} is not {_RANGE}") from exc
    if math.isinf(number):
        raise ParseError(f"{key} {_shown(item)} is not {_RANGE}")
    if math.isnan(number) or not SCORE_MIN <= int(number) <= SCORE_MAX:
        return None, f"{key} {_shown(item)} is not {_RANGE}"
    return number, None


def _json_subscores(payload: dict[str, Any]) -> tuple[list[int] | None, str | None]:
    """The first three entries of the object's `score` list, or None and a note on why there are none.
    Entries the release reads only by truncating (4.5, "4.5", true) are refused."""
    raw = payload.get("score")
    if not isinstance(raw, list) or len(raw) < len(QUALITY_KEYS):
        return None, None if raw is None else f"the score {_shown(raw)} is not a list of three scores"
    numbers: list[float] = []
    for item, key in zip(raw, QUALITY_KEYS, strict=False):
        number, note = _subscore(item, key)
        if number is None:
            return None, note
        numbers.append(number)
    for item, number, key in zip(raw, numbers, QUALITY_KEYS, strict=False):
        if isinstance(item, bool):
            raise ParseError(f"{key} true is not a score")
        _check_whole(number, f"{key} {_shown(item)}")
    return [int(number) for number in numbers], None


def _list_offsets(text: str, found: _JsonObject, values: list[int]) -> list[int | None]:
    """The digits of the object's `score` list: the last list written that agrees."""
    agreeing = [
        [m.start(i + 1) for i in range(len(QUALITY_KEYS))]
        for m in _JSON_LIST_AT.finditer(text, found.start, found.end)
        if [int(g) for g in m.groups()] == values
    ]
    return list(agreeing[-1]) if agreeing else [None] * len(QUALITY_KEYS)


def parse_quality_scores(text: str) -> ParsedAnswer:
    """Parse `{"score" : [s1, s2, s3], "reasoning" : "..."}` (aesthetics, technical quality, structure &
    texture): the JSON object's list, else the first `"score": [s1, s2, s3]`, else the first bare
    `[s1, s2, s3]`; quality is their minimum.

    >>> a = parse_quality_scores('{\\n  "score" : [4, 3, 5],\\n  "reasoning" : "Clean."\\n}')
    >>> {k: v.value for k, v in a.scores.items()}, a.reasoning
    ({'aesthetics': 4, 'technical_quality': 3, 'structure_texture': 5}, 'Clean.')
    """
    found = _json_object(text)
    reasoning = found.reasoning if found is not None else None
    note = None
    if found is not None:
        values, note = _json_subscores(found.payload)
        if values is not None:
            return _quality(values, _list_offsets(text, found, values), reasoning)
    listed = _SCORE_TRIPLE.search(text) or _BARE_TRIPLE.search(text)
    if listed is None:
        raise ParseError(note or 'no quality scores found in the answer (expected "score" : [s1, s2, s3])')
    values = [int(g) for g in listed.groups()]
    return _quality(values, [listed.start(i + 1) for i in range(len(QUALITY_KEYS))], reasoning)


def _quality(values: list[int], offsets: list[int | None], reasoning: str | None) -> ParsedAnswer:
    scores = {key: ScoreMatch(v, o) for key, v, o in zip(QUALITY_KEYS, values, offsets, strict=True)}
    return ParsedAnswer(scores=scores, reasoning=reasoning)
