"""Make the example images the README's quick start sends, so that its curl and Python blocks run as written.

A blue square on grey (`source.png`), the same square turned red (`edited.png`: the edit "Make the square
red." carried out) and a yellow square (`generated.png`, for "a yellow square on a plain grey background").
The critics see flat shapes as well as photographs, and the images stay a few KB. Run it from anywhere:

    python examples/make_images.py            # writes next to this file
    python examples/make_images.py --to DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SIDE = 256
BACKGROUND = (235, 235, 235)
SQUARE = (64, 64, 192, 192)  # left, top, right, bottom: a centred square half the image's side
IMAGES: dict[str, tuple[int, int, int]] = {
    "source.png": (40, 70, 220),  # blue
    "edited.png": (220, 40, 40),  # the same square, red
    "generated.png": (235, 210, 40),  # yellow
}


def draw(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    ImageDraw.Draw(image).rectangle(SQUARE, fill=colour)
    return image


def make(folder: Path) -> list[Path]:
    """Write every example image into `folder`; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, colour in IMAGES.items():
        draw(colour).save(folder / name, optimize=True)
        written.append(folder / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", type=Path, default=Path(__file__).resolve().parent, help="The folder to write.")
    for path in make(parser.parse_args().to):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
