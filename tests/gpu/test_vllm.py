"""vLLM engine on a GPU: the four routes over HTTP, and agreement with the transformers engine.

Skipped without CUDA or without vllm (`pip install -e ".[vllm,test]"`). Run on a GPU box with:

    python -m pytest tests/gpu -q -m gpu
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engines.base import GenerationRequest, GenerationResult
from server.engines.transformers import TransformersEngine
from server.judges import SCORE_TOKENS, load_judges
from server.tiny import ensure_tiny_checkpoint
from tests.support import b64, picture, running_server


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
    pytest.mark.skipif(not _cuda(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def vllm_checkpoint(cache_dir: Path) -> Path:
    """The tiny critic with attention heads vLLM's kernels support."""
    return ensure_tiny_checkpoint(cache_dir, shape="vllm")


VLLM_FLAGS = ("--engine", "vllm", "--max-model-len", "4096", "--gen-max-new-tokens", "1024", "--enforce-eager")
MEMORY_FLAGS = ("--edit-gpu-memory-utilization", "0.15", "--gen-gpu-memory-utilization", "0.15")


@pytest.fixture(scope="module")
def vllm_url(vllm_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    path = str(vllm_checkpoint)
    args = ("--edit-model", path, "--gen-model", path, *VLLM_FLAGS, *MEMORY_FLAGS)
    with running_server(cache_dir, *args, tiny=False, timeout=600) as url:
        yield url


def test_the_four_routes_score_on_vllm(vllm_url: str) -> None:
    client = httpx.Client(base_url=vllm_url, timeout=120)
    models = client.get("/v1/models").json()["models"]
    assert {m["engine"] for m in models} == {"vllm"}
    edit_item = {"source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
    responses = [
        client.post("/v1/edit/score", json={"items": [edit_item]}),
        client.post(
            "/v1/edit/score_group",
            json={
                "source": b64("blue"),
                "instruction": "Make the square red.",
                "candidates": [b64("red"), b64("blue")],
            },
        ),
        client.post("/v1/gen/score", json={"items": [{"image": b64("red"), "prompt": "a red square"}]}),
        client.post("/v1/gen/score_group", json={"prompt": "a red square", "images": [b64("red"), b64("green")]}),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            assert result["error"] is None, result
            assert result["reward"] is not None
            dims = [v for k, v in result.items() if isinstance(v, dict) and "score" in v]
            assert all(d["expected"] is not None for d in dims)


def _requests() -> list[GenerationRequest]:
    judges = load_judges()
    done, same = (picture("blue"), picture("red")), (picture("green"), picture("green"))
    return [
        GenerationRequest(judges["edit_execution"].prompt(done, instruction="Make the square red."), 128),
        GenerationRequest(judges["edit_consistency"].prompt(same, instruction="Paint the square orange."), 128),
        GenerationRequest(
            judges["gen_instruction_following"].prompt((picture("red"),), prompt="a red square", requirement="none"),
            128,
        ),
        GenerationRequest(judges["gen_quality"].prompt((picture("purple"),)), 128),
    ]


def test_vllm_and_transformers_agree_on_greedy_outputs(vllm_checkpoint: Path) -> None:
    from server.engines.vllm import VLLMEngine

    async def both() -> tuple[list[GenerationResult], list[GenerationResult]]:
        hf = TransformersEngine(str(vllm_checkpoint), SCORE_TOKENS, device="cuda", dtype="float32")
        vl = VLLMEngine(
            str(vllm_checkpoint),
            SCORE_TOKENS,
            dtype="float32",
            max_model_len=4096,
            gpu_memory_utilization=0.15,
            enforce_eager=True,
        )
        await hf.start()
        await vl.start()
        try:
            return await hf.generate(_requests()), await vl.generate(_requests())  # type: ignore[return-value]
        finally:
            await vl.close()

    hf_results, vllm_results = asyncio.run(both())
    judges = load_judges()
    names = ["edit_execution", "edit_consistency", "gen_instruction_following", "gen_quality"]
    for name, a, b in zip(names, hf_results, vllm_results, strict=True):
        assert a.text == b.text, (name, a.text, b.text)
        ja, jb = judges[name].judge(a), judges[name].judge(b)
        assert ja.scores == jb.scores
        for key in ja.expected:
            assert ja.expected[key] == pytest.approx(jb.expected[key], abs=0.05)
