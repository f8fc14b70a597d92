"""The prompts a critic is fine-tuned on: checked against its records, recorded next to its weights.

A critic answers best to the prompts it was trained with, so `firm-train` checks that every record
was rendered with the prompt set it is told (`--prompts`), and writes that set next to the weights
(`firm_prompts.json`, plus the template files of a set of the user's own). `firm-serve` then gives
the critic that set by default. The release's prompt text is never copied: its set is recorded by
source and digest.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.judges import Judge
from server.prompts.release import DEFAULT_SOURCE, PromptSource, ReleasedPrompt
from server.prompts.sets import FIRM, OWN, RECORD_FILE, ReleasedPrompts, describe, judges_for, prompt_set
from server.settings import default_cache_dir

SAVED_TEMPLATES = "prompts"  # folder of the critic holding the templates of a set of the user's own


def add_prompt_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--prompts and where the release's prompts come from, as firm-serve takes them; `what` says what
    the set is for in this command."""
    add = parser.add_argument
    add(
        "--prompts",
        default=OWN,
        type=_prompt_set,
        help=f"{what}: 'own' (this project's templates), 'firm' (the release's, fetched and verified as "
        "firm-serve does) or a directory of your own '<judge>.txt' templates (default: own).",
    )
    add("--prompt-source", default=DEFAULT_SOURCE, help="Where the release's prompt files are read (--prompts firm).")
    add("--allow-prompt-drift", action="store_true", help="Accept release prompt files whose digest differs.")
    add("--cache-dir", type=Path, default=default_cache_dir(), help="Where the release's prompt files are cached.")


def _prompt_set(value: str) -> str:
    try:
        return prompt_set(value, allow_auto=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def released_prompts(args: argparse.Namespace) -> ReleasedPrompts:
    """The release's prompts from the source the flags of `add_prompt_flags` name, fetched on first need."""
    return ReleasedPrompts(PromptSource(args.prompt_source, args.cache_dir, allow_drift=args.allow_prompt_drift))


def training_judges(
    setting: str, names: Iterable[str], released: Callable[[Sequence[str]], Mapping[str, ReleasedPrompt]]
) -> dict[str, Judge]:
    """The judges `names` with the prompt set `setting` (firm, own or a directory of templates)."""
    return judges_for("", sorted(set(names)), setting, released)


def check_records(records: Iterable[Mapping[str, Any]], judges: Mapping[str, Judge], setting: str) -> None:
    """Raise ValueError when a record's prompt is not what its judge renders from the record's fields."""
    wrong = []
    for record in records:
        judge = judges[record["judge"]]
        text = "".join(p["text"] for p in record["messages"][0]["content"] if p["type"] == "text")
        if text != judge.render(**record.get("fields", {})):
            wrong.append(str(record.get("id")))
    if wrong:
        shown = ", ".join(wrong[:5]) + (", ..." if len(wrong) > 5 else "")
        raise ValueError(
            f"{len(wrong)} records were not rendered with the {setting!r} prompts ({shown}); pass the --prompts "
            "that firm-curate rendered them with, so the critic is served the prompts it learned"
        )


def record_prompt_set(output: Path, setting: str, judges: Mapping[str, Judge]) -> None:
    """Write which prompts the critic in `output` was trained with; a set of the user's own travels with it."""
    recorded = setting
    if setting not in (FIRM, OWN):
        (output / SAVED_TEMPLATES).mkdir(parents=True, exist_ok=True)
        for name in judges:
            source = Path(setting) / f"{name}.txt"
            if source.is_file():
                shutil.copyfile(source, output / SAVED_TEMPLATES / f"{name}.txt")
        recorded = SAVED_TEMPLATES
    entry = {"prompts": recorded, "judges": describe(judges)}
    (output / RECORD_FILE).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
