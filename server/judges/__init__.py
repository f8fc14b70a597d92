"""The four FIRM judges: a prompt template (a data file) and a parser each.

Templates use `$name` placeholders (string.Template), so JSON braces in a rubric need no
escaping. Any template can be replaced from configuration with a file of the user's own.
"""

from __future__ import annotations

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
    parse_boxed_score,
    parse_json_score,
    parse_quality_scores,
)

SCORE_TOKENS = ("1", "2", "3", "4", "5")
NO_REQUIREMENT = "none"  # what the instruction-following prompt reads when an item has no extra requirement
P = TypeVar("P")

__all__ = [
    "JUDGES",
    "SCORE_TOKENS",
    "Judge",
    "JudgeOutcome",
    "ParseError",
    "TemplateError",
    "checked_template",
    "expected_score",
    "gen_fields",
    "load_judges",
]


class TemplateError(ValueError):
    """A prompt template is missing a placeholder its judge fills in."""


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    task: str
    fields: tuple[str, ...]
    parse: Callable[[str], ParsedAnswer]
    constraint: OutputConstraint  # the answer format, for engines with structured outputs


_SCORE = {"type": "integer", "minimum": 1, "maximum": 5}
JSON_SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "maxLength": 1200},
        "score": {"type": "array", "items": _SCORE, "minItems": 1, "maxItems": 1},
    },
    "required": ["reasoning", "score"],
    "additionalProperties": False,
}
QUALITY_SCHEMA = {
    "type": "object",
    "properties": {key: _SCORE for key in QUALITY_KEYS},
    "required": list(QUALITY_KEYS),
    "additionalProperties": False,
}
BOXED_REGEX = r"[^\\]{0,1500}\\boxed\{[1-5]\}"


# The order of `fields` is the order of the placeholders the template must contain.
JUDGES: dict[str, JudgeSpec] = {
    spec.name: spec
    for spec in (
        JudgeSpec("edit_execution", "edit", ("instruction",), parse_json_score, OutputConstraint(JSON_SCORE_SCHEMA)),
        JudgeSpec("edit_consistency", "edit", ("instruction",), parse_json_score, OutputConstraint(JSON_SCORE_SCHEMA)),
        JudgeSpec(
            "gen_instruction_following",
            "gen",
            ("prompt", "requirement"),
            parse_boxed_score,
            OutputConstraint(regex=BOXED_REGEX),
        ),
        JudgeSpec("gen_quality", "gen", (), parse_quality_scores, OutputConstraint(QUALITY_SCHEMA)),
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
    template: string.Template

    @property
    def name(self) -> str:
        return self.spec.name

    def prompt(self, images: tuple[P, ...], **fields: str) -> tuple[P | str, ...]:
        """One user turn: the images first (they and the rubric form a shared prefix), then the text.

        The images are usually PIL images; anything standing for one (a file reference) works too.
        """
        return (*images, self.template.substitute(fields))

    def judge(self, result: GenerationResult) -> JudgeOutcome:
        """Parse an answer; raises ParseError when it holds no valid score."""
        parsed = self.spec.parse(result.text)
        expected: dict[str, float | None] = {}
        for key, match in parsed.scores.items():
            step = result.step_at(match.offset)
            expected[key] = expected_score(step.probs) if step is not None else None
        return JudgeOutcome(
            scores={k: m.value for k, m in parsed.scores.items()},
            expected=expected,
            reasoning=parsed.reasoning,
        )


def gen_fields(prompt: str, requirement: str | None) -> dict[str, str]:
    """Template fields of the instruction-following judge, as served and as trained.

    >>> gen_fields("a red car", None)
    {'prompt': 'a red car', 'requirement': 'none'}
    """
    return {"prompt": prompt, "requirement": requirement or NO_REQUIREMENT}


def default_template_text(name: str) -> str:
    return resources.files("server.judges").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")


def checked_template(
    text: str, fields: Sequence[str], origin: str, what: str, error: type[TemplateError] = TemplateError
) -> string.Template:
    """`text` as a template that uses exactly the placeholders `fields`: a template missing one
    would silently drop a field, and one with an unknown name fails only when it is filled in."""
    template = string.Template(text)
    if not template.is_valid():
        raise error(f"{origin}: invalid '$' placeholder (write '$$' for a literal '$')")
    found = set(template.get_identifiers())
    missing = [f for f in fields if f not in found]
    unknown = sorted(found - set(fields))
    if missing or unknown:
        raise error(
            f"{origin}: {what} must use placeholders {['$' + f for f in fields]}; "
            f"missing {['$' + f for f in missing]}, unknown {['$' + f for f in unknown]}"
        )
    return template


def load_judges(overrides: Mapping[str, Path | None] | None = None) -> dict[str, Judge]:
    """Build every judge from its packaged template or from the user's file for it."""
    overrides = overrides or {}
    judges = {}
    for name, spec in JUDGES.items():
        path = overrides.get(name)
        if path is not None:
            text, origin = Path(path).read_text(encoding="utf-8"), str(path)
        else:
            text, origin = default_template_text(name), f"built-in {name}.txt"
        judges[name] = Judge(spec, checked_template(text, spec.fields, origin, f"template for {spec.name}"))
    return judges
