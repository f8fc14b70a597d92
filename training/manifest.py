"""JSONL manifests of items (curation inputs, benchmark files) with configurable field names.

Image paths in a manifest are relative to an image root (by default the manifest's folder).
An item without an id gets one from its content, so the same line keeps the same id when the
file is reordered or extended: that is what resuming relies on.

    >>> parse_field_map(["source=src_path", "instruction=edit_prompt"], ("source", "edited", "instruction"))
    {'source': 'src_path', 'edited': 'edited', 'instruction': 'edit_prompt'}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ManifestError(ValueError):
    """A manifest line that cannot be used, with where it is."""


def parse_field_map(pairs: Sequence[str] | None, names: Sequence[str]) -> dict[str, str]:
    """`name=column` pairs over the defaults (each name read from the column of the same name)."""
    mapping = {name: name for name in names}
    for pair in pairs or ():
        name, sep, column = pair.partition("=")
        if not sep or not column:
            raise ManifestError(f"--field wants NAME=COLUMN, got {pair!r}")
        if name not in mapping:
            raise ManifestError(f"--field: unknown name {name!r}; known: {', '.join(names)}")
        mapping[name] = column
    return mapping


@dataclass(frozen=True)
class Row:
    """One manifest line with its fields renamed to ours; `line` is 1-based."""

    id: str
    line: int
    values: dict[str, Any]

    def image(self, name: str, root: Path) -> Path:
        path = root / str(self.values[name])
        if not path.is_file():
            raise ManifestError(f"line {self.line}: {name} image {path} does not exist")
        return path

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return None if value is None else str(value)


def content_id(values: dict[str, Any]) -> str:
    blob = json.dumps(values, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def json_lines(path: Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file; a line that is not JSON raises `error`."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not JSON ({exc})") from exc


def read_manifest(path: Path, fields: dict[str, str], required: Sequence[str], id_field: str = "id") -> Iterator[Row]:
    """The rows of a JSONL manifest; raises ManifestError on a malformed line or a repeated id."""
    seen: set[str] = set()
    for number, raw in json_lines(path, ManifestError):
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}:{number}: each line must be a JSON object")
        missing = [f"{n} (column {fields[n]!r})" for n in required if raw.get(fields[n]) in (None, "")]
        if missing:
            raise ManifestError(f"{path}:{number}: missing {', '.join(missing)}")
        values = {name: raw.get(column) for name, column in fields.items()}
        item_id = str(raw[id_field]) if raw.get(id_field) not in (None, "") else content_id(values)
        if item_id in seen:
            raise ManifestError(f"{path}:{number}: id {item_id!r} appears twice")
        seen.add(item_id)
        yield Row(id=item_id, line=number, values=values)
