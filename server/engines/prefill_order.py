"""Which call of a request waits for which: calls that open with the same images prefill them once.

vLLM's prefix cache serves only blocks that an earlier engine step has computed, so calls submitted
together each prefill their shared opening (a GRPO edit group: the chat header and the source image,
G times over). Here a call whose opening, up to one of its images, an earlier call of the same request
already has, waits until that call's prompt is prefilled, and then finds the opening in the cache.
A call waits only when the shared opening is long enough to fill a cache block: a shorter one would
gain nothing and cost a step of latency. Calls of other requests are never held back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from PIL import Image

from server.engines.base import PromptPart


def _openings(parts: Sequence[PromptPart]) -> list[tuple[int, tuple[Hashable, ...]]]:
    """(end, key) of each opening that ends with an image: images by identity (a request's calls share
    its decoded images), text by value."""
    keys: list[Hashable] = []
    out = []
    for end, part in enumerate(parts, start=1):
        is_image = isinstance(part, Image.Image)
        keys.append(("image", id(part)) if is_image else ("text", part))
        if is_image:
            out.append((end, tuple(keys)))
    return out


def prefill_leaders(
    calls: Sequence[Sequence[PromptPart]], opening_tokens: Callable[[Sequence[PromptPart]], int], block_tokens: int
) -> list[int | None]:
    """For each call, the earlier call whose prefill it waits for (the first with its longest shared
    opening), or None when it goes at once."""
    first_with: dict[tuple[Hashable, ...], int] = {}
    leaders: list[int | None] = []
    for index, parts in enumerate(calls):
        openings = _openings(parts)
        leader = None
        for end, key in reversed(openings):
            if key in first_with:
                if opening_tokens(parts[:end]) >= block_tokens:
                    leader = first_with[key]
                break
        for _, key in openings:
            first_with.setdefault(key, index)
        leaders.append(leader)
    return leaders


def image_tokens(image: Image.Image, pixels_per_token: int, max_pixels: int | None) -> int:
    """About how many prompt tokens an image costs a Qwen-VL critic: one per merged patch, once its
    processor has brought it within `max_pixels`."""
    pixels = image.width * image.height
    return max(1, (pixels if max_pixels is None else min(pixels, max_pixels)) // pixels_per_token)
