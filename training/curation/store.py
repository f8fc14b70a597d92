"""A resumable JSONL file of records, written one item at a time.

Each item's records (one per judge dimension) reach the file in a single append, so an item is
either wholly there or not at all. Opening an existing file repairs what an interruption can
leave behind (a torn last line, an item with fewer records than it should have) by rewriting the
file without them through a temporary file and an atomic rename; those items count as not done
and are curated again. Done items are skipped on the next run: nothing is done twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def _lines(raw: bytes) -> Iterator[dict[str, Any] | None]:
    """Each line parsed; None for a line that is not a whole JSON object (a torn write)."""
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield None
            continue
        yield value if isinstance(value, dict) and "item_id" in value else None


class RecordStore:
    """Records of finished items, appended item by item; `records_per_item` says when one is whole."""

    def __init__(self, path: Path, records_per_item: int, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.records_per_item = records_per_item
        self.fsync = fsync
        self.repaired = 0  # lines dropped while opening
        self.done: set[str] = set()
        self._fd: int | None = None

    def __enter__(self) -> RecordStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _repair(self) -> None:
        raw = self.path.read_bytes()
        parsed = list(_lines(raw))
        counts = Counter(r["item_id"] for r in parsed if r is not None)
        whole = {item for item, n in counts.items() if n == self.records_per_item}
        kept = [r for r in parsed if r is not None and r["item_id"] in whole]
        self.done = whole
        self.repaired = len(parsed) - len(kept)
        if self.repaired or (raw and not raw.endswith(b"\n")):
            self._rewrite(kept)

    def _rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        handle, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(b"".join(_encode(r) for r in records))
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, self.path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise

    def add(self, item_id: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Append one finished item's records in one write."""
        if self._fd is None:
            raise RuntimeError("the record store is not open")
        if item_id in self.done:
            raise ValueError(f"item {item_id!r} is already in {self.path}")
        if len(records) != self.records_per_item or any(r["item_id"] != item_id for r in records):
            raise ValueError(f"item {item_id!r} needs {self.records_per_item} records carrying its id")
        data = b"".join(_encode(r) for r in records)
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        if self.fsync:
            os.fsync(self._fd)
        self.done.add(item_id)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record in the file now."""
        if self.path.exists():
            yield from (r for r in _lines(self.path.read_bytes()) if r is not None)


def _encode(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
