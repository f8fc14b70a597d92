"""What the curation pipelines ask the teacher models, as `$placeholder` templates.

These prompts are for the teachers that label data, not for the critic: the critic's prompts
are the server's judge templates, which the records reuse. Each can be replaced with a file of
the user's own (`--describe-prompt` and friends) that uses the same placeholders.
"""

from __future__ import annotations

import string
from pathlib import Path

from server.judges import TemplateError

DESCRIBE = """\
The first image is an original picture and the second is an edited version of it. You are not \
told what the edit was meant to do.

List every visible difference between the two images as precisely as you can: what changed, \
where in the picture, and how (objects added, removed, moved or reshaped; colours, text, pose, \
expression, background, lighting, style, framing). Mention any region that looks degraded or \
distorted in the edited image. Say explicitly when the images look identical.

Describe only what you can see, one difference per line, most prominent first."""

GRADE = """\
You grade an image edit without seeing the images. You are given the editing instruction and a \
careful list of every visible difference between the original and the edited image.

Editing instruction: $instruction

Observed differences:
$differences

Give two grades from 1 to 5.

execution - was the instruction carried out? 5: fully and correctly; 4: with small inaccuracies \
or omissions; 3: partly, a noticeable part missing or wrong; 2: only a faint or mostly wrong \
attempt; 1: not at all. Ignore changes the instruction did not ask for, and ignore image quality.

consistency - did everything the instruction did not mention stay the same? 5: nothing else \
changed; 4: one minor unintended change; 3: several minor ones, or one significant one; 2: a \
significant one together with others; 1: much of the picture changed. Do not count areas the \
requested change naturally covers, small variations in quality or sharpness, or direct physical \
consequences of the edit such as shadows and reflections.

For each grade write one or two plain sentences, as someone looking at both pictures would: name \
what is visible, never "the description" or "the list".

Reply with JSON only:
{"execution": {"reasoning": "...", "score": N}, "consistency": {"reasoning": "...", "score": N}}"""

PLAN = """\
Turn the text-to-image prompt below into a checklist of separate requirements that can each be \
checked by looking at a picture: every object, count, attribute, colour, position or relation, \
piece of written text and style it asks for. Keep each item short and add nothing the prompt \
does not ask for. Treat the additional requirement, unless it is "none", as part of the prompt.

Prompt: $prompt
Additional requirement: $requirement

Reply with JSON only: {"checklist": ["...", "..."]}"""

CHECK = """\
The image was generated from the prompt below. Check it against each checklist item in turn, \
then rate how faithfully it follows the prompt from 1 to 5. 5: every item is met; 4: nearly all \
are met, one small detail is off; 3: the main subject is right but several items are missed; \
2: only a few items are met; 1: the image does not follow the prompt. Judge content only, not \
beauty or rendering quality.

Prompt: $prompt
Additional requirement: $requirement

Checklist:
$checklist

Reply with JSON only, one entry per checklist item, in order:
{"checks": [{"item": "...", "verdict": "met" | "partly met" | "not met", "note": "..."}], \
"summary": "<one or two sentences on why the rating was chosen>", "score": N}
where the note says in a few words what the image shows for that item."""

PLACEHOLDERS = {
    "describe": (DESCRIBE, ()),
    "grade": (GRADE, ("instruction", "differences")),
    "plan": (PLAN, ("prompt", "requirement")),
    "check": (CHECK, ("prompt", "requirement", "checklist")),
}


class PromptError(TemplateError):
    """A replacement prompt that does not use exactly its step's placeholders."""


def checked_template(text: str, fields: tuple[str, ...], origin: str, what: str) -> string.Template:
    """`text` as a template that uses exactly the placeholders `fields`: one missing would silently
    drop a field, and one with an unknown name fails only when it is filled in."""
    template = string.Template(text)
    if not template.is_valid():
        raise PromptError(f"{origin}: invalid '$' placeholder (write '$$' for a literal '$')")
    found = set(template.get_identifiers())
    missing = [f for f in fields if f not in found]
    unknown = sorted(found - set(fields))
    if missing or unknown:
        raise PromptError(
            f"{origin}: {what} must use placeholders {['$' + f for f in fields]}; "
            f"missing {['$' + f for f in missing]}, unknown {['$' + f for f in unknown]}"
        )
    return template


def load_prompt(step: str, path: Path | None = None) -> string.Template:
    """The prompt of `step`, built in or from the user's file, checked for its placeholders."""
    default, fields = PLACEHOLDERS[step]
    text = default if path is None else Path(path).read_text(encoding="utf-8")
    return checked_template(text, fields, str(path or step), f"the {step} prompt")
