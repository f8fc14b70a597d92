"""Which prompts each served model gets.

- `auto` (the default): the released checkpoints get the release's prompts; a critic trained with
  `firm-train` gets the set it was trained with (recorded next to its weights); any other model
  gets this project's packaged templates.
- `firm`: the release's prompts, for every model.
- `own`: the packaged templates; a directory: the user's `<judge>.txt` files there (judges without
  a file keep the packaged template). Either logs a warning for a released checkpoint, which was
  not trained on them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.judges import Judge, load_judges, make_judge
from server.prompts.release import PromptSource, ReleasedPrompt, is_released_checkpoint

log = logging.getLogger(__name__)

AUTO, FIRM, OWN = "auto", "firm", "own"
RECORD_FILE = "firm_prompts.json"  # written next to a critic's weights by firm-train


def recorded_set(model: str) -> dict[str, Any] | None:
    """The prompt set a locally trained critic records next to its weights, if any."""
    record = Path(model) / RECORD_FILE
    if not record.is_file():
        return None
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{record}: not a readable prompt-set record: {exc}") from exc
    if not isinstance(found, dict) or not isinstance(found.get("prompts"), str):
        raise ValueError(f"{record}: a prompt-set record needs a 'prompts' entry")
    return found


def prompt_set(value: str, *, allow_auto: bool = True) -> str:
    """`value`, once it names a prompt set: auto (unless not allowed), firm, own or a directory of templates.

    >>> prompt_set("own")
    'own'
    >>> prompt_set("auto", allow_auto=False)
    Traceback (most recent call last):
    ValueError: expected firm, own or a directory of templates, got 'auto'
    """
    named = (AUTO, FIRM, OWN) if allow_auto else (FIRM, OWN)
    if value in named or Path(value).is_dir():
        return value
    raise ValueError(f"expected {', '.join(named)} or a directory of templates, got {value!r}")


def chosen_set(setting: str, model: str, record: Mapping[str, Any] | None = None) -> str:
    """`firm`, `own` or a directory: what `setting` gives `model` (whose prompt-set record is read unless
    given; "" is no model: training renders the set it is told)."""
    if setting != AUTO:
        if setting != FIRM and is_released_checkpoint(model):
            log.warning("%s was trained on the release's prompts, but --prompts %s serves other ones", model, setting)
        return setting
    if is_released_checkpoint(model):
        return FIRM
    if record is None and model:
        record = recorded_set(model)
    if record is None:
        return OWN
    chosen = record["prompts"]
    if chosen not in (FIRM, OWN):
        chosen = str(Path(model) / chosen)  # templates saved with the weights
    log.info("%s uses the prompts it was trained with (%s)", model, chosen)
    return chosen


def _check_recorded(model: str, record: Mapping[str, Any] | None, judges: Mapping[str, Judge]) -> None:
    """A trained critic whose recorded template digests no longer match what it is served is told."""
    for name, entry in ((record or {}).get("judges") or {}).items():
        judge = judges.get(name)
        if judge is not None and isinstance(entry, dict) and entry.get("sha256") not in (None, judge.sha256):
            log.warning(
                "%s: %s was trained with a prompt of digest %s but is served %s (%s)",
                model,
                name,
                entry.get("sha256"),
                judge.sha256,
                judge.origin,
            )


def judges_for(
    model: str,
    names: Sequence[str],
    setting: str,
    released: Callable[[Sequence[str]], Mapping[str, ReleasedPrompt]],
    overrides: Mapping[str, Path | None] | None = None,
) -> dict[str, Judge]:
    """The judges `names` of `model` under the `--prompts` setting; `released` obtains the release's
    prompts (only called when they are needed). Per-judge template files in `overrides` win."""
    record = recorded_set(model) if model else None
    chosen = chosen_set(setting, model, record)
    folder = None if chosen in (FIRM, OWN) else Path(chosen)
    files: dict[str, Path | None] = {
        n: folder / f"{n}.txt" for n in names if folder and (folder / f"{n}.txt").is_file()
    }
    given = {n: Path(p) for n, p in (overrides or {}).items() if p is not None and n in names}
    for name, path in given.items():
        if is_released_checkpoint(model):
            log.warning("%s was trained on the release's prompts, but %s replaces the one of %s", model, path, name)
    judges = load_judges(files | given, names)  # this project's templates, but for the files given
    if chosen == FIRM:
        fetched = released([n for n in names if n not in given])
        judges |= {n: make_judge(n, p.text, p.origin, sha256=p.sha256, verified=p.verified) for n, p in fetched.items()}
    _check_recorded(model, record, judges)
    return judges


def describe(judges: Mapping[str, Judge]) -> dict[str, dict[str, Any]]:
    """What firm-train records next to a critic's weights: each judge's template origin and digest."""
    return {name: {"origin": j.origin, "sha256": j.sha256} for name, j in judges.items()}


class ReleasedPrompts:
    """The release's prompts from one source, obtained on first need and kept for the process."""

    def __init__(self, source: PromptSource) -> None:
        self.source = source
        self._found: dict[str, ReleasedPrompt] = {}

    def __call__(self, names: Sequence[str]) -> dict[str, ReleasedPrompt]:
        missing = [n for n in names if n not in self._found]
        if missing:
            self._found.update(self.source.prompts(missing))
        return {n: self._found[n] for n in names}


__all__ = [
    "AUTO",
    "FIRM",
    "OWN",
    "RECORD_FILE",
    "ReleasedPrompts",
    "chosen_set",
    "describe",
    "judges_for",
    "prompt_set",
]
