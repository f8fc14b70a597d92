"""A GRPO edit group prefills its source once: on its first scoring, vLLM's prefix cache serves the
calls that follow the first, as its own counters show."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from clients.images import encode
from server.tiny import COLOURS, draw_square
from tests.support import metric_value, running_server
from tests.vllm.conftest import widen_images
from tests.vllm.test_engine import CPU_FLAGS

SIDE = 1024  # 1,024 prompt tokens an image: the source fills 8 of the CPU build's 128-token blocks
GROUP = 8


@pytest.fixture(scope="module")
def large_image_checkpoint(vllm_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return widen_images(vllm_checkpoint, tmp_path_factory.mktemp("large-images"), SIDE)


def _first_scoring_share(url: str) -> float:
    """The share of a new group's prompt tokens that vLLM's prefix cache served on its first scoring."""
    colours = list(COLOURS)
    body = {
        "source": _image("blue", 200),
        "instruction": "Make the square red.",
        "candidates": [_image(colours[i % len(colours)], 100 + i) for i in range(GROUP)],
    }
    names = ("firm_vllm_prefix_cache_hits_total", "firm_vllm_prefix_cache_queries_total")
    before = [metric_value(httpx.get(f"{url}/metrics").text, n) for n in names]
    response = httpx.post(f"{url}/v1/edit/score_group", json=body, timeout=600)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    # the tiny critic never saw such images: an answer may not parse, but every call got one from vLLM
    assert len(results) == GROUP, results
    assert all(r["error"] is None or r["error"]["code"] != "engine_error" for r in results), results
    after = [metric_value(httpx.get(f"{url}/metrics").text, n) for n in names]
    hits, queries = (a - b for a, b in zip(after, before, strict=True))
    assert queries > 0
    return hits / queries


def _image(colour: str, shade: int) -> str:
    """A SIDE x SIDE square picture, told apart by its background's shade."""
    return encode(draw_square(colour, (shade, shade, shade)).resize((SIDE, SIDE)), "PNG")


def test_a_group_reads_its_shared_source_from_the_cache_on_its_first_scoring(
    large_image_checkpoint: Path, cache_dir: Path, vllm_python: str, vllm_vars: dict[str, str]
) -> None:
    """With group prefill, the group's first call prefills the source (and its candidate) and the others find
    them cached. Without, the calls prefill together; only those that vLLM's per-step token budget pushes to
    a later step find anything cached."""
    args = ("--edit-model", str(large_image_checkpoint), "--gen-model", "none", *CPU_FLAGS, "--cache-size", "0")
    # the step budget vLLM gives an embedded engine: several calls' prefill spans steps, so the share without
    # group prefill stays low; the offline budget (firm-serve's default) lets timing decide how much is cached
    args += ("--image-pixel-budget", str(SIDE * SIDE), "--max-num-batched-tokens", "2048")
    shares = {}
    for flag in ("--group-prefill", "--no-group-prefill"):
        with running_server(cache_dir, *args, flag, tiny=False, timeout=600, python=vllm_python, env=vllm_vars) as url:
            shares[flag] = _first_scoring_share(url)
    assert shares["--group-prefill"] >= 0.4, shares
    assert shares["--group-prefill"] > shares["--no-group-prefill"] + 0.1, shares
