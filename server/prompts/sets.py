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

from server.judges import JUDGES, Judge, load_judges, make_judge
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


def chosen_set(setting: str, model: str) -> str:
    """`firm`, `own` or a directory: what `setting` gives `model`."""
    if setting != AUTO:
        if setting not in (FIRM, OWN) and not Path(setting).is_dir():
            raise ValueError(f"--prompts must be auto, firm, own or a directory of templates, got {setting!r}")
        if setting != FIRM and is_released_checkpoint(model):
            log.warning("%s was trained on the release's prompts, but --prompts %s serves other ones", model, setting)
        return setting
    if is_released_checkpoint(model):
        return FIRM
    record = recorded_set(model) if model else None  # "" is no model: training renders a set it is told
    if record is None:
        return OWN
    chosen = record["prompts"]
    if chosen not in (FIRM, OWN):
        chosen = str(Path(model) / chosen)  # templates saved with the weights
    log.info("%s uses the prompts it was trained with (%s)", model, chosen)
    return chosen


def _own_with(directory: Path, names: Sequence[str]) -> dict[str, Judge]:
    judges = load_judges(names=names)
    for name in names:
        path = directory / f"{name}.txt"
        if path.is_file():
            judges[name] = make_judge(name, path.read_text(encoding="utf-8"), str(path))
    return judges


def _check_recorded(model: str, judges: Mapping[str, Judge]) -> None:
    """A trained critic whose recorded template digests no longer match what it is served is told."""
    record = (recorded_set(model) if model else None) or {}
    for name, entry in (record.get("judges") or {}).items():
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
    chosen = chosen_set(setting, model)
    if chosen == FIRM:
        judges = {
            name: make_judge(name, p.text, p.origin, sha256=p.sha256, verified=p.verified)
            for name, p in released(names).items()
        }
    elif chosen == OWN:
        judges = load_judges(names=names)
    else:
        judges = _own_with(Path(chosen), names)
    for name in names:
        path = (overrides or {}).get(name)
        if path is not None:
            if is_released_checkpoint(model):
                log.warning("%s was trained on the release's prompts, but %s replaces the one of %s", model, path, name)
            judges[name] = make_judge(name, Path(path).read_text(encoding="utf-8"), str(path))
    _check_recorded(model, judges)
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


__all__ = ["AUTO", "FIRM", "JUDGES", "OWN", "RECORD_FILE", "ReleasedPrompts", "chosen_set", "describe", "judges_for"]
