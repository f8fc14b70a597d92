"""What the watch keeps of an item's images: thumbnails for the page, and how far an edit moved its input.

Both are made from the decoded images in the decoding thread, off the event loop, so the scoring
path pays a resize per image and nothing more. Thumbnails live in memory only (`server.watch.ring`).

The unchanged-edit distance is the mean absolute difference of the two images, each shrunk to
`DISTANCE_SIDE` x `DISTANCE_SIDE` RGB pixels (box filter), on a 0-1 scale. Under `UNCHANGED_DISTANCE`
(0.01: one part in a hundred of the full range, averaged over every pixel and channel) the output is
counted as the input returned unchanged. JPEG re-encoding of the same image at quality 75 moves it by
about 0.002; the smallest edit a person would see (a 16-pixel square recoloured in a 256-pixel image)
by more than 0.01.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageStat

THUMBNAIL_SIDE = 128  # the longest side of a thumbnail, pixels
DISTANCE_SIDE = 64
UNCHANGED_DISTANCE = 0.01


@dataclass(frozen=True)
class Looks:
    """An item's thumbnails (JPEG data URLs, in prompt order) and its edit distance, where it has one."""

    thumbnails: tuple[str, ...] = ()
    distance: float | None = None

    @property
    def unchanged(self) -> bool:
        return self.distance is not None and self.distance < UNCHANGED_DISTANCE


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> str:
    """`image` shrunk to at most `side` pixels a side, as a JPEG data URL."""
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shrunk(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((DISTANCE_SIDE, DISTANCE_SIDE), Image.Resampling.BOX)


def distance(before: Image.Image, after: Image.Image) -> float:
    """Mean absolute pixel difference of the two images at DISTANCE_SIDE pixels a side, 0 (same) to 1.

    >>> grey = Image.new("RGB", (300, 200), (128, 128, 128))
    >>> distance(grey, grey.copy())
    0.0
    >>> round(distance(grey, Image.new("RGB", (300, 200), (255, 128, 128))), 3)
    0.166
    """
    diff = ImageChops.difference(_shrunk(before), _shrunk(after))
    return sum(ImageStat.Stat(diff).mean) / (3 * 255)


class LookMaker:
    """Makes an item's `Looks`; thumbnails only when there is a ring to keep them. An image shared by
    several items (a group's source) is shrunk once per request."""

    def __init__(self, thumbnails: bool) -> None:
        self.thumbnails = thumbnails

    def make(self, images: Sequence[Image.Image], pair: tuple[int, int] | None, seen: dict[int, str]) -> Looks:
        thumbs: tuple[str, ...] = ()
        if self.thumbnails:
            thumbs = tuple(self._thumbnail(image, seen) for image in images)
        moved = None if pair is None else distance(images[pair[0]], images[pair[1]])
        return Looks(thumbs, moved)

    @staticmethod
    def _thumbnail(image: Image.Image, seen: dict[int, str]) -> str:
        if id(image) not in seen:
            seen[id(image)] = thumbnail(image)
        return seen[id(image)]
