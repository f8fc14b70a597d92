"""What the watch keeps of an item's images: thumbnails for the page, and how far an edit moved its input.

Both are made from the decoded images in the decoding thread, off the event loop, from one small
copy of each image (a whole-factor box reduction, the cheapest resize there is), so the scoring path
pays that and nothing more: the thumbnails are kept as small images and encoded only when the page
asks for them. They live in memory only (`server.watch.ring`).

The unchanged-edit distance is the mean absolute difference of the two images, each shrunk to
`DISTANCE_SIDE` x `DISTANCE_SIDE` RGB pixels (box filters), on a 0-1 scale. Under `UNCHANGED_DISTANCE`
(0.01: one part in a hundred of the full range, averaged over every pixel and channel) the output is
counted as the input returned unchanged. JPEG re-encoding of the same image at quality 75 moves it by
about 0.002; the smallest edit a person would see (a 16-pixel square recoloured in a 256-pixel image)
by more than 0.01.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageStat

THUMBNAIL_SIDE = 128  # the longest side of a thumbnail, pixels
DISTANCE_SIDE = 64
UNCHANGED_DISTANCE = 0.01


@dataclass(frozen=True)
class Looks:
    """An item's thumbnails (small images, in prompt order) and its edit distance, where it has one."""

    thumbnails: tuple[Image.Image, ...] = ()
    distance: float | None = None

    @property
    def unchanged(self) -> bool:
        return self.distance is not None and self.distance < UNCHANGED_DISTANCE


def small(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """`image` shrunk by a whole factor (a box filter, the cheapest resize there is) to at most `side`
    pixels a side."""
    factor = math.ceil(max(image.size) / side)
    return image.reduce(factor) if factor > 1 else image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((DISTANCE_SIDE, DISTANCE_SIDE), Image.Resampling.BOX)


def _grid_distance(before: Image.Image, after: Image.Image) -> float:
    """Mean absolute pixel difference of two images already on the DISTANCE_SIDE grid, 0 (same) to 1."""
    return sum(ImageStat.Stat(ImageChops.difference(before, after)).mean) / (3 * 255)


class LookMaker:
    """Makes an item's `Looks`; thumbnails only when there is a ring to keep them. Each image is shrunk
    once per request, whatever number of items share it (a group's source), and the thumbnail and the
    distance are both made from that small copy."""

    def __init__(self, thumbnails: bool) -> None:
        self.thumbnails = thumbnails

    def make(
        self, images: Sequence[Image.Image], pair: tuple[int, int] | None, seen: dict[int, Any], *, kept: bool = True
    ) -> Looks:
        """`kept` False for an item the ring will not hold: its distance is made, its thumbnails are not."""
        thumbs: tuple[Image.Image, ...] = ()
        if self.thumbnails and kept:
            thumbs = tuple(self._small(image, seen) for image in images)
        moved = None
        if pair is not None:
            before, after = (
                self._cached(seen, ("grid", id(images[i])), lambda i=i: _grid(self._small(images[i], seen)))
                for i in pair
            )
            moved = _grid_distance(before, after)
        return Looks(thumbs, moved)

    def _small(self, image: Image.Image, seen: dict[Any, Any]) -> Image.Image:
        return self._cached(seen, ("small", id(image)), lambda: small(image))

    @staticmethod
    def _cached(seen: dict[Any, Any], key: Any, make: Any) -> Any:
        if key not in seen:
            seen[key] = make()
        return seen[key]
