"""What the client sends for each image: by default the bytes the FIRM release's trainers send, other
encodings when asked, through the constructor, the environment, firm-score and the trainer adapters.

The release's trainers (VisionXLab/FIRM-Reward at ba41493: editing/flow_grpo/rewards.py lines 84-129,
generation/flow_grpo/rewards.py lines 389-392 and 485-516) turn a float batch into 8 bits with
`(x * 255).round().clamp(0, 255)` and save each image with PIL's `save(format="JPEG")`, no other option.
A mock server (httpx.MockTransport) records each request; every image sent is decoded from it.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clients import RewardClient
from clients import cli as firm_score
from clients.adapters.flow_grpo import multi_score
from server.images import ImageLimits, decode_image


class Recorder:
    """A gen critic that scores every item and keeps each image it was sent, as raw bytes."""

    def __init__(self) -> None:
        self.images: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"ready": True, "models": {}})
        items = json.loads(request.content)["items"]
        self.images += [base64.b64decode(item["image"].rpartition(",")[2]) for item in items]  # a data URL's too
        dimension = {"score": 5, "expected": None, "normalized": 1.0}
        quality = {**dimension, "subscores": {"aesthetics": 5, "technical_quality": 5, "structure_texture": 5}}
        result = {"instruction_following": dimension, "quality": quality, "reward": 1.0, "error": None}
        header = {"model": {"name": "critic"}, "score_mode": "argmax", "weights": {"w1": 0.4, "w2": 0.6}}
        return httpx.Response(200, json={**header, "results": [{"id": i["id"], **result} for i in items]})


@pytest.fixture(autouse=True)
def no_encoding_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FIRM_IMAGE_FORMAT", raising=False)
    monkeypatch.delenv("FIRM_JPEG_QUALITY", raising=False)
    yield


def sent(images: Any, **options: Any) -> list[bytes]:
    """The bytes of each image a client built with `options` sends for `images`."""
    recorder = Recorder()
    with RewardClient("http://critic:8000", http_transport=httpx.MockTransport(recorder), **options) as client:
        reply = client.score_generations(images, "a red square")
    assert reply.mask() == [True] * len(recorder.images)
    return recorder.images


def saved(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def release_jpeg(batch: torch.Tensor) -> list[bytes]:
    """The release's bytes for an NCHW float batch."""
    arrays = (batch * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    return [saved(Image.fromarray(array), format="JPEG") for array in arrays]


def photo(side: int = 48, seed: int = 0) -> Image.Image:
    """Smooth colour with noise: JPEG's quantisation shows on it, unlike on flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(3 * x + seed), np.cos(4 * y), x * y], axis=-1) * 100 + 120
    return Image.fromarray((base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8))


def test_the_default_is_the_release_jpeg_for_every_kind_of_pixels(tmp_path: Path) -> None:
    batch = torch.stack([torch.from_numpy(np.array(photo(seed=s))).permute(2, 0, 1).float() / 255 for s in range(2)])
    assert sent(batch) == release_jpeg(batch)
    half = batch.to(torch.bfloat16)  # the release rounds in the tensor's own dtype
    assert sent(half) == release_jpeg(half)
    image = photo(seed=3)
    image.save(tmp_path / "photo.png")
    expected = saved(image, format="JPEG")
    assert sent([image, np.array(image), tmp_path / "photo.png", str(tmp_path / "photo.png")]) == [expected] * 4
    decoded = Image.open(io.BytesIO(expected))
    assert decoded.format == "JPEG"
    assert decoded.quantization == Image.open(io.BytesIO(saved(image, format="JPEG", quality=75))).quantization
    assert decoded.quantization != Image.open(io.BytesIO(saved(image, format="JPEG", quality=90))).quantization


def test_the_environment_and_the_options_choose_another_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    image = photo()
    monkeypatch.setenv("FIRM_IMAGE_FORMAT", "png")
    (png,) = sent(image)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert Image.open(io.BytesIO(png)).tobytes() == image.tobytes()  # the exact pixels
    monkeypatch.setenv("FIRM_JPEG_QUALITY", "90")
    assert sent(image, image_format="JPEG") == [saved(image, format="JPEG", quality=90)]  # the option wins
    assert sent(image, image_format="JPEG", jpeg_quality=40) == [saved(image, format="JPEG", quality=40)]
    monkeypatch.setenv("FIRM_JPEG_QUALITY", "high")
    with pytest.raises(ValueError, match="FIRM_JPEG_QUALITY must be a number, got 'high'"):
        RewardClient("http://critic:8000")
    monkeypatch.delenv("FIRM_JPEG_QUALITY")
    for bad in ({"jpeg_quality": 0}, {"jpeg_quality": 101}, {"image_format": "GIF"}):
        with pytest.raises(ValueError, match=r"jpeg_quality|image_format"):
            RewardClient("http://critic:8000", **{"jpeg_quality": 75, **bad})


def test_encoded_bytes_go_as_they_are_and_an_undecodable_file_too(tmp_path: Path) -> None:
    png = saved(photo(), format="PNG")
    (tmp_path / "cut.png").write_bytes(png[:60])  # a header and no pixels: for the server to refuse
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert sent([png, data_url, tmp_path / "cut.png"]) == [png, png, png[:60]]


def test_transparency_is_flattened_onto_white_as_the_server_flattens_it() -> None:
    rgba = Image.new("RGBA", (32, 32), (200, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 200, 255), (8, 8, 24, 24))  # an opaque blue square
    served = decode_image(base64.b64encode(saved(rgba, format="PNG")).decode(), "image", ImageLimits())
    assert sent(rgba) == [saved(served, format="JPEG")]
    assert Image.open(io.BytesIO(sent(rgba)[0])).getpixel((1, 1)) == pytest.approx((255, 255, 255), abs=3)


def test_a_file_is_sent_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo(side=40).crop((0, 0, 40, 20)).save(tmp_path / "turned.jpg", exif=exif)
    (sent_bytes,) = sent(tmp_path / "turned.jpg", image_format="PNG")
    assert Image.open(io.BytesIO(sent_bytes)).size == (20, 40)


def test_firm_score_sends_the_release_jpeg_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = photo()
    image.save(tmp_path / "cat.png")
    recorder = Recorder()
    monkeypatch.setattr(firm_score, "RewardClient", partial(RewardClient, http_transport=httpx.MockTransport(recorder)))
    for options in ([], ["--image-format", "png"], ["--jpeg-quality", "90"]):
        with pytest.raises(SystemExit) as done:
            firm_score.main(["gen", "--image", str(tmp_path / "cat.png"), "--prompt", "a cat", *options])
        assert done.value.code == 0
    default, png, q90 = recorder.images
    assert default == saved(image, format="JPEG")
    assert Image.open(io.BytesIO(png)).tobytes() == image.tobytes()
    assert q90 == saved(image, format="JPEG", quality=90)
    with pytest.raises(SystemExit) as refused:
        firm_score.main(["gen", "--image", str(tmp_path / "cat.png"), "--prompt", "a cat", "--jpeg-quality", "0"])
    assert refused.value.code == 2 and "jpeg_quality must be between 1 and 100" in capsys.readouterr().err


def test_the_trainer_adapters_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    reward_fn = multi_score("cuda", {"firm_gen": 1.0})
    try:
        assert (reward_fn.client.config.image_format, reward_fn.client.config.jpeg_quality) == ("JPEG", 75)
    finally:
        reward_fn.client.close()
    monkeypatch.setenv("FIRM_IMAGE_FORMAT", "PNG")
    reward_fn = multi_score("cuda", {"firm_gen": 1.0})  # built inside a trainer's code: only the environment reaches it
    try:
        assert reward_fn.client.config.image_format == "PNG"
    finally:
        reward_fn.client.close()
    reward_fn = multi_score("cuda", {"firm_gen": 1.0}, image_format="JPEG", jpeg_quality=90)
    try:
        assert (reward_fn.client.config.image_format, reward_fn.client.config.jpeg_quality) == ("JPEG", 90)
    finally:
        reward_fn.client.close()
    with pytest.raises(ValueError, match="its own settings"):
        multi_score("cuda", {"firm_gen": 1.0}, client=object(), image_format="PNG")  # type: ignore[arg-type]


def test_a_file_named_by_several_items_is_encoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.images as images
    from tests.support import picture

    picture("blue").save(tmp_path / "source.png")
    calls: list[object] = []
    real = images.encode
    monkeypatch.setattr(images, "encode", lambda image, *a: calls.append(image) or real(image, *a))
    encoder = images.Encoder()
    first, second = encoder(tmp_path / "source.png"), encoder(Path(str(tmp_path / "source.png")))
    assert first == second and len(calls) == 1
    # named by equal strings read from metadata (separate objects), too
    third, fourth = encoder("".join([str(tmp_path), "/source.png"])), encoder(f"{tmp_path}/source.png")
    assert third == fourth == first and len(calls) == 1  # one read and encode, however the file is named
