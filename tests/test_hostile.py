"""Hostile input: generated requests from the OpenAPI document, and a corpus of nasty images and bodies.

Every case must be answered with a 4xx or an item-level error, never a 5xx, and the server must
keep serving afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support import b64, running_server


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    with running_server(cache_dir, "--max-items-per-request", "4", "--max-body-bytes", "2000000") as url:
        yield url


def test_generated_requests_from_the_openapi_document(url: str) -> None:
    """schemathesis: no 5xx, and every response matches the documented schema, status and type."""
    checks = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks",
        checks,
        "--max-examples",
        "10",
        "--workers",
        "1",
        "--seed",
        "20261128",
        "--phases",
        "coverage,fuzzing",
        "--exclude-path-regex",
        "/v1/admin/.*",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims any size, with a few bytes of pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _enc(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


ITEM_LEVEL = {
    "truncated jpeg": _enc(_jpeg("red")[:200]),
    "wrong magic bytes": _enc(b"\x89PNX" + _jpeg("red")[4:]),
    "jpeg magic, png body": _enc(b"\xff\xd8\xff" + base64.b64decode(b64("red"))[3:]),
    "zero-size image": _enc(_png_header(0, 0)),
    "header only": _enc(_png_header(64, 64)),
    "gif": _enc(b"GIF89a" + b"\x00" * 20),
    "text": _enc("ünïcødé ✓ \u202e".encode()),
    "not base64": "%%%%",
    "data url of svg": "data:image/svg+xml;base64," + _enc(b"<svg/>"),
    "elongated": _enc(_png_header(1, 100_000)),
}


@pytest.mark.parametrize("name", list(ITEM_LEVEL))
def test_broken_images_fail_their_item_only(url: str, name: str) -> None:
    body = {
        "items": [
            {"id": "good", "image": b64("red"), "prompt": "a red square"},
            {"id": "bad", "image": ITEM_LEVEL[name], "prompt": "a red square"},
        ]
    }
    response = httpx.post(f"{url}/v1/gen/score", json=body, timeout=60)
    if response.status_code == 413:  # a header claiming a huge size is refused before decoding
        assert response.json()["error"]["code"] == "image_too_large"
        return
    assert response.status_code == 200, response.text
    good, bad = response.json()["results"]
    assert good["reward"] is not None
    assert bad["reward"] is None and bad["error"]["code"] == "invalid_image"


def _deep_json() -> bytes:
    return ("[" * 50_000 + "]" * 50_000).encode()


HOSTILE_BODIES: dict[str, tuple[dict | bytes, int]] = {
    "huge dimensions": ({"items": [{"image": _enc(_png_header(60_000, 60_000)), "prompt": "p"}]}, 413),
    "deep json": (_deep_json(), 422),
    "very long prompt": ({"items": [{"image": b64("red"), "prompt": "x" * 100_000}]}, 422),
    "body over the limit": ({"items": [{"image": "A" * 2_100_000, "prompt": "p"}]}, 413),
    "wrong types": ({"items": [{"image": 7, "prompt": ["p"]}]}, 422),
    "null items": ({"items": None}, 422),
    "too many items": ({"items": [{"image": b64("red"), "prompt": "p"}] * 5}, 413),
}


def _post(url: str, body: dict | bytes) -> httpx.Response:
    """POST `body` to /v1/gen/score: a dict as JSON (a lone surrogate escaped as \\ud800, as a JSON client
    would), bytes as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/gen/score", content=content, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_get_a_clean_4xx(url: str, name: str) -> None:
    body, status = HOSTILE_BODIES[name]
    response = _post(url, body)
    assert response.status_code == status, response.text[:500]
    assert "Traceback" not in response.text


SCORED, REFUSED = "scored", "422"
UNICODE: dict[str, tuple[str, str]] = {
    "emoji and combining marks": ("emoji 🎨🖼️ and combining e\u0301", SCORED),
    "right-to-left override": ("right-to-left \u202eedoc", SCORED),
    "nul": ("nul \u0000 inside", SCORED),
    "blank": (" ", SCORED),
    # not a Unicode string at all: JSON can carry it escaped, but pydantic refuses it as a string
    "lone surrogate": ("lone \ud800 surrogate", REFUSED),
}


@pytest.mark.parametrize("name", list(UNICODE))
def test_unicode_edge_cases_are_scored_unless_they_are_not_text(url: str, name: str) -> None:
    text, expected = UNICODE[name]
    response = _post(url, {"items": [{"image": b64("red"), "prompt": text, "requirement": text}]})
    if expected == REFUSED:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and "items[0].prompt" in error["message"]
        return
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["error"] is None and result["reward"] is not None


def _scores_a_plain_item(url: str) -> bool:
    response = _post(url, {"items": [{"image": b64("red"), "prompt": "a red square"}]})
    return response.status_code == 200 and response.json()["results"][0]["reward"] is not None


def test_the_server_still_serves_after_the_whole_corpus(url: str) -> None:
    """Self-contained, so it means the same whichever tests ran before it: every hostile body, broken image
    and unicode case in turn, then an ordinary request is still scored."""
    assert _scores_a_plain_item(url)
    for body, _ in HOSTILE_BODIES.values():
        assert _post(url, body).status_code < 500
    for image in ITEM_LEVEL.values():
        assert _post(url, {"items": [{"image": image, "prompt": "a red square"}]}).status_code < 500
    for text, _ in UNICODE.values():
        assert _post(url, {"items": [{"image": b64("red"), "prompt": text}]}).status_code < 500
    assert _scores_a_plain_item(url)
