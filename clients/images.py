"""Turn what a trainer holds into the base64 text the protocol carries, once per image.

Accepted: PIL images, numpy arrays (HWC uint8, or NHWC), torch tensors (CHW float in [0, 1],
or NCHW), file paths, data URLs and raw encoded bytes. Pixels (images, arrays, tensors and the
files at paths) are encoded as the client's setting says, by default as the FIRM release's
trainers encode them: JPEG at PIL's default quality, 75. Raw bytes (PNG, JPEG or WebP) and data
URLs are already encoded, and are sent as they are.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

ImageLike = Any  # PIL.Image.Image | numpy.ndarray | torch.Tensor | str | Path | bytes

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what the server decodes
RELEASE_FORMAT = "JPEG"  # the release's trainers save every image as JPEG before sending it to the critics
RELEASE_QUALITY = 75  # with no quality given, so PIL's default

_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")


def _is_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_array(value: object) -> bool:
    return type(value).__module__.startswith("numpy") and hasattr(value, "shape")


def _from_array(array: Any) -> Image.Image:
    import numpy as np

    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be HWC with 1, 3 or 4 channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8, got {array.dtype}; scale floats with (x * 255).round()")
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _from_tensor(tensor: Any) -> Image.Image:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"torch images must be CHW with 1, 3 or 4 channels, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        # The release's own conversion, in the tensor's own dtype, so a bfloat16 batch rounds as it does there.
        tensor = (tensor.detach() * 255).round().clamp(0, 255)
    array = tensor.detach().to("cpu").byte().permute(1, 2, 0).numpy()
    return _from_array(array)


def _from_file(raw: bytes) -> Image.Image | None:
    """The upright pixels of an image file, or None when PIL cannot decode it: such a file is sent as it
    is, so that the server's refusal fails its item alone and names the field."""
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return ImageOps.exif_transpose(image)  # the orientation the server would give the file itself
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def _flattened(image: Image.Image) -> Image.Image:
    """RGB or L pixels for JPEG; transparency goes onto white, as the server flattens the images it is sent."""
    if image.mode in ("RGB", "L"):
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.endswith("A"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def split_batch(images: Any) -> list[Any]:
    """A 4-D array or tensor is a batch: one image per leading index. Anything else passes through."""
    if (_is_tensor(images) or _is_array(images)) and images.ndim == 4:
        return list(images)
    if isinstance(images, Sequence) and not isinstance(images, str | bytes):
        return list(images)
    return [images]


def encode(image: ImageLike, image_format: str = "PNG", quality: int = RELEASE_QUALITY) -> str:
    """Base64 text (or the data URL given) of one image. `quality` applies to JPEG and WebP. This step's own
    default is lossless PNG; the client's default encoding is `ClientConfig`'s."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, str | Path):
        raw = Path(image).read_bytes()
        decoded = _from_file(raw)
        if decoded is None:
            return base64.b64encode(raw).decode("ascii")
        image = decoded
    if isinstance(image, bytes | bytearray):
        if not bytes(image[:8]).startswith(_SIGNATURES):
            raise ValueError("raw bytes must be an encoded PNG, JPEG or WebP file")
        return base64.b64encode(bytes(image)).decode("ascii")
    if _is_tensor(image):
        image = _from_tensor(image)
    elif _is_array(image):
        image = _from_array(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot send a {type(image).__name__} as an image")
    image_format = image_format.upper()
    if image_format == "JPEG":
        image = _flattened(image)
    buffer = io.BytesIO()
    # JPEG: no option beyond the quality, so the bytes are those of the release's `save(format="JPEG")` at 75.
    # PNG: fast compression, about 40% less time than the default for about 10% more bytes.
    image.save(buffer, format=image_format, quality=quality, compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Encoder:
    """Encodes each distinct image once per call (a group's shared source, repeated items, a file named
    by several items), as the client's setting says; by default as the release does."""

    def __init__(self, image_format: str = RELEASE_FORMAT, quality: int = RELEASE_QUALITY) -> None:
        self.image_format, self.quality = image_format, quality
        self._done: dict[object, tuple[object, str]] = {}

    def __call__(self, image: ImageLike) -> str:
        # a file is the same image whichever str or Path names it (equal strings encode alike, base64 ones too);
        # anything else is known by identity
        key: object = ("named", os.fspath(image)) if isinstance(image, (str, Path)) else id(image)
        if key not in self._done:
            self._done[key] = (image, encode(image, self.image_format, self.quality))  # keep it alive
        return self._done[key][1]
