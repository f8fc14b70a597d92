"""Decode and check the images of a request, once each.

Only PNG, JPEG and WebP are accepted. Size limits are checked before the pixels are decoded
(a decompression bomb is refused from its header). Undecodable input raises InvalidImage,
which fails its item only; an image over a limit raises ImageTooLarge (HTTP 413).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?P<params>(?:;[\w=.-]+)*?);base64,", re.IGNORECASE)
_ALLOWED_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}


class InvalidImage(ValueError):
    """Bytes that are not a decodable PNG, JPEG or WebP image."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ImageTooLarge(ValueError):
    """An image over the byte or pixel limit."""

    def __init__(self, field: str, reason: str, limit: int) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.limit = limit


# The Qwen3-VL image processor's own upper bound (its `longest_edge`, 4096 x 4096 pixels): within it the
# processor keeps an image's size up to its 32-pixel grid, so the server leaves such images alone.
QWEN3_VL_MAX_PIXELS = 16_777_216
QWEN3_VL_PATCH_SIZE, QWEN3_VL_MERGE_SIZE = 16, 2  # a 16-pixel patch; 2 x 2 patches merge into one token
MAX_ASPECT_RATIO = 200.0  # Qwen vision processors refuse anything more elongated


def max_vision_tokens(
    pixel_budget: int,
    *,
    patch_size: int = QWEN3_VL_PATCH_SIZE,
    merge_size: int = QWEN3_VL_MERGE_SIZE,
    processor_max_pixels: int = QWEN3_VL_MAX_PIXELS,
) -> int:
    """Most tokens one image can cost the critic once the server has fitted it to `pixel_budget`.

    The processor rounds each side to its grid of `patch_size * merge_size` pixels (half a cell at
    most each way, on a side no more elongated than MAX_ASPECT_RATIO), never past its own pixel cap,
    and wraps the image's tokens in a start and an end token.

    >>> max_vision_tokens(QWEN3_VL_MAX_PIXELS)  # a 4096 x 4096 image
    16386
    >>> max_vision_tokens(512 * 512)  # 256 at a square's grid, more for an elongated image of the same area
    372
    """
    cell = patch_size * merge_size
    pixels = min(pixel_budget, processor_max_pixels)
    sides = math.sqrt(pixels) * (math.sqrt(MAX_ASPECT_RATIO) + 1 / math.sqrt(MAX_ASPECT_RATIO))
    area = pixels + cell / 2 * sides + (cell / 2) ** 2
    return min(math.ceil(area / cell**2), processor_max_pixels // cell**2) + 2


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # refused before decoding: a bomb never reaches memory
    pixel_budget: int = QWEN3_VL_MAX_PIXELS  # larger images are downscaled to this many pixels (a memory guard)
    max_aspect_ratio: float = MAX_ASPECT_RATIO


def _strip_data_url(data: str, field: str) -> str:
    match = _DATA_URL.match(data)
    if match is None:
        if data.startswith("data:"):
            raise InvalidImage(field, "malformed data URL; expected data:image/<type>;base64,<data>")
        return data
    mime = (match.group("mime") or "").lower()
    if mime not in _ALLOWED_MIME:
        raise InvalidImage(field, f"unsupported media type {mime or '(none)'}; use PNG, JPEG or WebP")
    return data[match.end() :]


def decode_base64(data: str, field: str, limits: ImageLimits) -> bytes:
    payload = _strip_data_url(data.strip(), field)
    approx = len(payload) * 3 // 4
    if approx > limits.max_bytes + 2:
        raise ImageTooLarge(
            field, f"image is about {approx} bytes, over the limit of {limits.max_bytes}", limits.max_bytes
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(field, "not valid base64") from exc
    if len(raw) > limits.max_bytes:
        raise ImageTooLarge(field, f"image is {len(raw)} bytes, over the limit of {limits.max_bytes}", limits.max_bytes)
    return raw


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white so a transparent pixel is not read as black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or image.mode.endswith("A"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit_to_budget(image: Image.Image, pixel_budget: int) -> Image.Image:
    """Downscale keeping the aspect ratio so that width * height <= pixel_budget."""
    w, h = image.size
    if w * h <= pixel_budget:
        return image
    scale = (pixel_budget / (w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def load_image(raw: bytes, field: str, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            image_format = image.format
            if image_format not in ALLOWED_FORMATS:
                raise InvalidImage(field, f"unsupported format {image_format}; use PNG, JPEG or WebP")
            w, h = image.size
            if w * h > limits.max_pixels:
                raise ImageTooLarge(
                    field,
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}",
                    limits.max_pixels,
                )
            if max(w, h) > limits.max_aspect_ratio * min(w, h):
                raise InvalidImage(field, f"aspect ratio of {w}x{h} is over {limits.max_aspect_ratio:g}:1")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy of an already upright image
    except (InvalidImage, ImageTooLarge):
        raise
    except UnidentifiedImageError as exc:
        raise InvalidImage(field, "not a recognisable image; use PNG, JPEG or WebP") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(field, "image is a decompression bomb", limits.max_pixels) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(field, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    return fit_to_budget(_to_rgb(image), limits.pixel_budget)


DIGEST_KEY = "firm_digest"


def decode_image(data: str, field: str, limits: ImageLimits) -> Image.Image:
    """Base64 or data URL in, an RGB image upright and within the pixel budget out.

    The image carries a digest of the bytes it came from (`image.info[DIGEST_KEY]`): the same
    bytes always decode to the same pixels, and hashing them is ten times cheaper than the pixels.
    """
    raw = decode_base64(data, field, limits)
    image = load_image(raw, field, limits)
    image.info[DIGEST_KEY] = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return image
