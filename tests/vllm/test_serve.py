"""`firm-serve --engine openai` against a real `vllm serve` (the CPU build) on the tiny critic.

The canned stub of tests/test_engine_openai.py stays for the fault cases (a failing or slow URL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from clients.protocol import EditGroupResponse, EditScoreResponse, GenScoreResponse
from tests.support import b64, free_port, running_process, running_server

SERVED = "tiny-critic"
M = TypeVar("M", EditScoreResponse, EditGroupResponse, GenScoreResponse)


@pytest.fixture(scope="module")
def vllm_serve(vllm_checkpoint: Path, cache_dir: Path, vllm_python: str, vllm_vars: dict[str, str]) -> Iterator[str]:
    """`vllm serve` on loopback, serving the tiny critic; its base URL."""
    port = free_port()
    vllm = str(Path(vllm_python).parent / "vllm")
    cmd = [vllm, "serve", str(vllm_checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", SERVED, "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    cmd += ["--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--max-model-len", "16384"]
    url = f"http://127.0.0.1:{port}"
    log_path = cache_dir / f"vllm-serve-{port}.log"
    with running_process("vllm serve", cmd, log_path, f"{url}/v1/models", env=vllm_vars, timeout=600):
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def firm_url(vllm_serve: str, cache_dir: Path) -> Iterator[str]:
    args = ("--engine", "openai", "--openai-base-urls", vllm_serve, "--edit-model", SERVED, "--gen-model", SERVED)
    with running_server(cache_dir, *args, tiny=False) as url:
        yield url


def test_vllm_serve_names_the_score_digits_for_logprob_token_ids(vllm_serve: str) -> None:
    # what the openai engine asks at start; each digit must be one token of its own
    root = vllm_serve.removesuffix("/v1")
    for digit in "12345":
        body = {"model": SERVED, "prompt": digit, "add_special_tokens": False}
        tokens = httpx.post(f"{root}/tokenize", json=body, timeout=30).json()["tokens"]
        assert len(tokens) == 1


def _score(firm_url: str, route: str, body: dict[str, Any], reply: type[M]) -> M:
    response = httpx.post(f"{firm_url}/v1/{route}", json={**body, "score_mode": "expected"}, timeout=300)
    assert response.status_code == 200, response.text
    return reply.model_validate(response.json())


def test_edit_and_gen_score_end_to_end_with_expected_values(firm_url: str) -> None:
    edit = {"source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
    (result,) = _score(firm_url, "edit/score", {"items": [edit]}, EditScoreResponse).results
    assert result.error is None and result.reward is not None
    assert result.execution is not None and result.execution.expected is not None
    assert result.consistency is not None and result.consistency.expected is not None

    group = {"source": b64("blue"), "instruction": "Make the square red.", "candidates": [b64("red"), b64("blue")]}
    assert _score(firm_url, "edit/score_group", group, EditGroupResponse).group.scored == 2

    gen = {"image": b64("red"), "prompt": "a red square"}
    (result,) = _score(firm_url, "gen/score", {"items": [gen]}, GenScoreResponse).results
    assert result.error is None and result.reward is not None
    assert result.instruction_following is not None and result.instruction_following.expected is not None
    assert result.quality is not None and result.quality.expected is not None
