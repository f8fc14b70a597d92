"""The four FIRM judges: a prompt template, a parser and a token budget each.

Templates follow the release's conventions: `str.format` fields (`{prompt}`, `{requirement}`),
JSON braces doubled where a template has fields, and a template without fields (quality) sent
exactly as written. Where a template's text comes from is chosen per model (`server.prompts`):
the release's own, verified at run time, this project's packaged templates (the released shape,
in our own words), or the user's files.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from server.engines.base import GenerationResult, OutputConstraint
from server.judges.parsing import (
    QUALITY_KEYS,
    ParsedAnswer,
    ParseError,
    parse_alignment_rating,
    parse_json_score,
    parse_quality_scores,
)

SCORE_TOKENS = ("1", "2", "3", "4", "5")
P = TypeVar("P")

__all__ = [
    "JUDGES",
    "SCORE_TOKENS",
    "Judge",
    "JudgeOutcome",
    "ParseError",
    "TemplateError",
    "checked_template",
    "edit_fields",
    "expected_score",
    "gen_fields",
    "load_judges",
    "make_judge",
]


class TemplateError(ValueError):
    """A prompt template is missing a field its judge fills in, or names one it does not."""


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    task: str
    fields: dict[str, str]  # caller's name -> the template's field name; empty: the text is sent as written
    required: tuple[str, ...]  # template fields a template must use (one it left out would be dropped silently)
    parse: Callable[[str], ParsedAnswer]
    constraint: OutputConstraint  # the released answer format, for engines with structured outputs
    max_new_tokens: int  # the release's budget for this judge


_SCORE = {"type": "integer", "minimum": 1, "maximum": 5}
JSON_SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "score": {"type": "array", "items": _SCORE, "minItems": 1, "maxItems": 1},
    },
    "required": ["reasoning", "score"],
    "additionalProperties": False,
}
QUALITY_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "array", "items": _SCORE, "minItems": 3, "maxItems": 3},
        "reasoning": {"type": "string"},
    },
    "required": ["score", "reasoning"],
    "additionalProperties": False,
}
# The analysis, the final paragraph, then the rating line and a box that repeats the same rating.
ALIGNMENT_REGEX = (
    r"[\s\S]*\*\*Final Analysis\*\*:[\s\S]*\*\*Final Alignment Rating: (?:"
    + "|".join(rf"{n}\*\*\n\\boxed\{{{n}\}}" for n in SCORE_TOKENS)
    + ")"
)
# new tokens per answer in the release's reward servers: the edit critic's short JSON, the gen critic's analysis
EDIT_BUDGET, GEN_BUDGET = 256, 8192
EDIT_FIELDS = {"instruction": "prompt", "requirement": "requirement"}
GEN_FIELDS = {"prompt": "prompt", "requirement": "requirement"}


def _edit_judge(name: str) -> JudgeSpec:
    return JudgeSpec(
        name,
        "edit",
        EDIT_FIELDS,
        ("prompt",),
        parse_json_score,
        OutputConstraint(JSON_SCORE_SCHEMA),
        EDIT_BUDGET,
    )


JUDGES: dict[str, JudgeSpec] = {
    spec.name: spec
    for spec in (
        _edit_judge("edit_execution"),
        _edit_judge("edit_consistency"),
        JudgeSpec(
            "gen_instruction_following",
            "gen",
            GEN_FIELDS,
            ("prompt", "requirement"),
            parse_alignment_rating,
            OutputConstraint(regex=ALIGNMENT_REGEX),
            GEN_BUDGET,
        ),
        JudgeSpec("gen_quality", "gen", {}, (), parse_quality_scores, OutputConstraint(QUALITY_SCHEMA), GEN_BUDGET),
    )
}


@dataclass(frozen=True)
class JudgeOutcome:
    """One judge's verdict: the written scores and their expected values (None when unknown)."""

    scores: dict[str, int]
    expected: dict[str, float | None]
    reasoning: str | None


def expected_score(probs: Mapping[str, float]) -> float | None:
    """Probability-weighted mean of the 1-5 score tokens, renormalised over them.

    >>> expected_score({"1": 0.0, "2": 0.0, "3": 0.5, "4": 0.5, "5": 0.0})
    3.5
    """
    total = sum(probs.get(t, 0.0) for t in SCORE_TOKENS)
    if total <= 0.0:
        return None
    return sum(int(t) * probs.get(t, 0.0) for t in SCORE_TOKENS) / total


@dataclass(frozen=True)
class Judge:
    spec: JudgeSpec
    text: str  # the template
    origin: str  # where the text came from: a file, a URL#CONSTANT, or the packaged template
    sha256: str  # of the released file it was read from, else of the text itself
    max_new_tokens: int
    verified: bool | None = None  # for the release's prompts: whether the file matched its pinned digest

    @property
    def name(self) -> str:
        return self.spec.name

    def render(self, **fields: str | None) -> str:
        """The text a call carries, as the release renders it: `format` with a missing requirement as "",
        and a template without fields sent as written."""
        if not self.spec.fields:
            return self.text
        values = {self.spec.fields[name]: value or "" for name, value in fields.items()}
        for name in self.spec.fields.values():
            values.setdefault(name, "")
        return self.text.format(**values)

    def prompt(self, images: tuple[P, ...], **fields: str | None) -> tuple[P | str, ...]:
        """One user turn: the images first (they and the rubric form a shared prefix), then the text.

        The images are usually PIL images; anything standing for one (a file reference) works too.
        """
        return (*images, self.render(**fields))

    def judge(self, result: GenerationResult) -> JudgeOutcome:
        """Parse an answer; raises ParseError when it holds no valid score."""
        parsed = self.spec.parse(result.text)
        expected: dict[str, float | None] = {}
        for key, match in parsed.scores.items():
            step = result.step_at(match.offset) if match.offset is not None else None
            expected[key] = expected_score(step.probs) if step is not None else None
        return JudgeOutcome(
            scores={k: m.value for k, m in parsed.scores.items()},
            expected=expected,
            reasoning=parsed.reasoning,
        )


def edit_fields(instruction: str, requirement: str | None = None) -> dict[str, str]:
    """Fields of the edit judges (the release renders the instruction as `{prompt}`); a missing
    requirement is ""."""
    return {"instruction": instruction, "requirement": requirement or ""}


def gen_fields(prompt: str, requirement: str | None) -> dict[str, str]:
    """Fields of the instruction-following judge; a missing requirement is "", as in the release.

    >>> gen_fields("a red car", None)
    {'prompt': 'a red car', 'requirement': ''}
    """
    return {"prompt": prompt, "requirement": requirement or ""}


def checked_template(text: str, spec: JudgeSpec, origin: str, error: type[TemplateError] = TemplateError) -> str:
    """`text`, once it is a valid `str.format` template that uses the fields `spec` requires and no
    other: one missing would silently drop a field, an unknown one fails only when it is filled in.
    A judge without fields takes any text: it is sent as written."""
    if not spec.fields:
        return text
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise error(f"{origin}: {exc} (write {{{{ and }}}} for literal braces)") from exc
    allowed = set(spec.fields.values())
    unknown = sorted({n for n in names if n not in allowed})
    missing = [f for f in spec.required if f not in names]
    if missing or unknown:
        raise error(
            f"{origin}: the template for {spec.name} must use the fields "
            f"{['{' + f + '}' for f in spec.required]} and may use {sorted('{' + f + '}' for f in allowed)}; "
            f"missing {['{' + f + '}' for f in missing]}, unknown {['{' + f + '}' for f in unknown]}"
            + (" (write {{ and }} for literal braces)" if unknown else "")
        )
    return text


def make_judge(name: str, text: str, origin: str, *, sha256: str | None = None, verified: bool | None = None) -> Judge:
    """Judge `name` with the template `text` (checked) and the release's token budget; its digest is
    the text's unless given."""
    spec = JUDGES[name]
    return Judge(
        spec=spec,
        text=checked_template(text, spec, origin),
        origin=origin,
        sha256=sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest(),
        max_new_tokens=spec.max_new_tokens,
        verified=verified,
    )


def packaged_template(name: str) -> str:
    return resources.files("server.judges").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")


def load_judges(
    overrides: Mapping[str, Path | None] | None = None, names: Sequence[str] | None = None
) -> dict[str, Judge]:
    """This project's own judges: the packaged template of each, or the user's file for it."""
    overrides = overrides or {}
    judges = {}
    for name in names or JUDGES:
        path = overrides.get(name)
        if path is not None:
            judges[name] = make_judge(name, Path(path).read_text(encoding="utf-8"), str(path))
        else:
            judges[name] = make_judge(name, packaged_template(name), f"packaged {name}.txt")
    return judges


__all__ += ["QUALITY_KEYS"]
