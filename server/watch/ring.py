"""The recent items the watch page shows: a bounded ring in memory, never written anywhere.

`--watch-samples N` keeps the last N scored items; 0 keeps none (and no thumbnail is made). A
sample's thumbnails are small images (at most 128 pixels a side, about 50 KB each in memory), encoded
as JPEG data URLs when the page first asks for them, once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from server.watch.looks import data_url

MAX_TEXT_CHARS = 500  # of an instruction or prompt, as the page shows it
MAX_REASONING_CHARS = 2000  # of each judge's reasoning


def clipped(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Sample:
    """One scored item as the page lists it."""

    seq: int
    time: float
    task: str
    item: str
    text: str
    thumbnails: tuple[Image.Image, ...]
    scores: dict[str, dict[str, Any]]  # dimension -> score, expected, reasoning
    reward: float | None
    error: str | None
    distance: float | None
    unchanged: bool
    flagged: bool
    tags: tuple[str, ...] = field(default=())  # low, high, failed, flagged: what the page filters on

    @functools.cached_property
    def thumbnail_urls(self) -> list[str]:
        """The thumbnails as JPEG data URLs, encoded the first time the page asks and kept: the page asks
        again every few seconds."""
        return [data_url(image) for image in self.thumbnails]

    def view(self) -> dict[str, Any]:
        """The sample as the page reads it, its thumbnails as JPEG data URLs."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return fields | {"thumbnails": self.thumbnail_urls, "tags": list(self.tags)}


class SampleRing:
    """The last `size` samples; `size` 0 keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._samples: deque[Sample] = deque(maxlen=size)  # a deque of 0 keeps nothing
        self._seq = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def keeps(self, index: int, count: int) -> bool:
        """Whether item `index` of `count` added together is still held once all are added: the ring
        keeps the last `size` only, so no thumbnail or sample is made for the others."""
        return index >= count - self.size

    def next_seq(self) -> int:
        return next(self._seq)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def latest(self, limit: int | None = None, tag: str | None = None) -> list[Sample]:
        """Newest first, only those tagged `tag` when given."""
        chosen = [s for s in reversed(self._samples) if tag is None or tag in s.tags]
        return chosen if limit is None else chosen[:limit]
