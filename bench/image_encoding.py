"""Bytes per GRPO group and client-side encode time of each image encoding the client offers.

For groups of G images of S x S pixels (photo-like: smooth gradients and mild noise), it encodes each
image as the client does (`clients.images.Encoder`) and prints, per encoding, the encode time per image
and per group, and the group's request bytes (base64 text, as the protocol carries it). JPEG at 75 is
the FIRM release's encoding and the client's default; PNG shows the critic the exact pixels.

    python bench/image_encoding.py                          # G = 8 and 24, 512 and 1024 px
    python bench/image_encoding.py --groups 8 --sides 256 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client_overhead import photo_like
from clients.images import RELEASE_FORMAT, RELEASE_QUALITY, Encoder

ENCODINGS = ((RELEASE_FORMAT, RELEASE_QUALITY), ("PNG", RELEASE_QUALITY))


@dataclass(frozen=True)
class Row:
    group: int
    side: int
    encoding: str
    ms_per_image: float
    group_ms: float
    group_kib: float


def name(image_format: str, quality: int) -> str:
    return f"{image_format} q{quality}" if image_format != "PNG" else "PNG"


def measure(images: list[Image.Image], image_format: str, quality: int, repeats: int) -> tuple[float, int]:
    """Median seconds to encode the group once (a fresh encoder each time, as each call has), and its bytes."""
    times, size = [], 0
    for _ in range(repeats):
        encoder = Encoder(image_format, quality)
        started = time.perf_counter()
        texts = [encoder(image) for image in images]
        times.append(time.perf_counter() - started)
        size = sum(len(text) for text in texts)
    return statistics.median(times), size


def rows(groups: list[int], sides: list[int], repeats: int) -> list[Row]:
    out = []
    for side in sides:
        pictures = [photo_like(side, seed) for seed in range(max(groups))]  # distinct images: no cache hit
        for group in groups:
            for image_format, quality in ENCODINGS:
                seconds, size = measure(pictures[:group], image_format, quality, repeats)
                out.append(
                    Row(group, side, name(image_format, quality), 1000 * seconds / group, 1000 * seconds, size / 1024)
                )
    return out


def table(results: list[Row]) -> str:
    lines = [
        "| G | side | encoding | encode ms / image | encode ms / group | KiB / group |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.group} | {r.side} | {r.encoding} | {r.ms_per_image:.1f} | {r.group_ms:.0f} | {r.group_kib:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 24], help="group sizes G")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="encodes of each group; the median time is shown")
    args = parser.parse_args(argv)
    print(table(rows(args.groups, args.sides, args.repeats)))


if __name__ == "__main__":
    main()
