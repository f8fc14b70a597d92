from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from clients.images import encode
from server.images import QWEN3_VL_MAX_PIXELS, ImageLimits, ImageTooLarge, InvalidImage, decode_image

LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000, pixel_budget=256 * 256)


def _encoded(image: Image.Image, image_format: str, **save: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_each_accepted_format_decodes_to_rgb(image_format: str) -> None:
    image = decode_image(_encoded(Image.new("RGB", (40, 30), (200, 10, 10)), image_format), "image", LIMITS)
    assert image.mode == "RGB"
    assert image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert r > 150 and g < 60 and b < 60


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "image/webp"])
def test_data_urls_are_accepted(mime: str) -> None:
    fmt = mime.split("/")[1].upper()
    data = f"data:{mime};base64," + _encoded(Image.new("RGB", (8, 8)), fmt)
    assert decode_image(data, "image", LIMITS).size == (8, 8)


def test_data_url_of_another_type_is_refused() -> None:
    data = "data:image/gif;base64," + _encoded(Image.new("RGB", (8, 8)), "GIF")
    with pytest.raises(InvalidImage, match="unsupported media type image/gif"):
        decode_image(data, "items[0].edited", LIMITS)


def test_gif_bytes_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(_encoded(Image.new("RGB", (8, 8)), "GIF"), "items[3].source", LIMITS)
    assert caught.value.field == "items[3].source"
    assert "unsupported format GIF" in str(caught.value)


def test_transparency_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_image(_encoded(image, "PNG"), "image", LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (0, 0, 255)


def test_palette_image_with_transparency() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    decoded = decode_image(_encoded(image, "PNG", transparency=0), "image", LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (0, 255, 0)


def test_greyscale_becomes_rgb() -> None:
    decoded = decode_image(_encoded(Image.new("L", (6, 6), 128), "PNG"), "image", LIMITS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_encoded(image, "JPEG", exif=exif.tobytes()), "image", LIMITS)
    assert decoded.size == (20, 40)


def test_truncated_file_fails_the_item() -> None:
    raw = base64.b64decode(_encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    with pytest.raises(InvalidImage, match="cannot decode"):
        decode_image(base64.b64encode(raw[: len(raw) // 2]).decode(), "edited", LIMITS)


def test_non_image_bytes_fail_the_item() -> None:
    with pytest.raises(InvalidImage, match="not a recognisable image"):
        decode_image(base64.b64encode(b"hello, not an image").decode(), "edited", LIMITS)


def test_invalid_base64_fails_the_item() -> None:
    with pytest.raises(InvalidImage, match="not valid base64"):
        decode_image("!!!not base64!!!", "edited", LIMITS)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 5000 x 1000 one-bit pixels compress to a few kB but would be 5 M pixels decoded
    bomb = _encoded(Image.new("1", (5000, 1000)), "PNG")
    assert len(bomb) < 10_000
    with pytest.raises(ImageTooLarge, match="over the limit of 4000000") as caught:
        decode_image(bomb, "source", LIMITS)
    assert caught.value.limit == LIMITS.max_pixels


def test_bytes_over_the_limit_are_refused() -> None:
    small = ImageLimits(max_bytes=1024, max_pixels=LIMITS.max_pixels, pixel_budget=LIMITS.pixel_budget)
    noisy = _encoded(Image.effect_noise((128, 128), 80).convert("RGB"), "PNG")
    with pytest.raises(ImageTooLarge, match="over the limit of 1024"):
        decode_image(noisy, "source", small)


def test_large_images_are_downscaled_to_the_pixel_budget_keeping_aspect() -> None:
    decoded = decode_image(_encoded(Image.new("RGB", (1024, 512)), "PNG"), "image", LIMITS)
    w, h = decoded.size
    assert w * h <= LIMITS.pixel_budget
    assert abs(w / h - 2.0) < 0.02


def test_by_default_an_image_the_critic_sees_whole_is_not_touched() -> None:
    """The default budget is the Qwen3-VL processor's own limit: the processor alone decides the grid."""
    from server.settings import Settings

    limits = Settings().image_limits()
    assert limits.pixel_budget == QWEN3_VL_MAX_PIXELS == 4096 * 4096
    image = Image.new("RGB", (2048, 1536), (10, 20, 30))
    assert decode_image(_encoded(image, "PNG"), "image", limits).size == (2048, 1536)


def test_encode_then_decode_round_trips() -> None:
    image = Image.new("RGB", (12, 9), (1, 2, 3))
    assert decode_image(encode(image), "image", LIMITS).tobytes() == image.tobytes()


def test_extremely_elongated_images_fail_the_item() -> None:
    with pytest.raises(InvalidImage, match="aspect ratio of 3x900 is over 200:1"):
        decode_image(_encoded(Image.new("RGB", (3, 900)), "PNG"), "image", LIMITS)
