"""`firm-serve --engine vllm` over HTTP: the four routes, vLLM's own batching, its prefix cache,
greedy parity with the transformers engine, and a call vLLM refuses failing alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clients.images import encode
from clients.protocol import MAX_PROMPT_CHARS, GenScoreResponse
from server.tiny import draw_square
from tests.support import b64, free_port, metric_value, running_server

CPU_FLAGS = ("--engine", "vllm", "--dtype", "float32", "--enforce-eager", "--log-level", "warning")


@pytest.fixture(scope="module")
def vllm_url(vllm_checkpoint: Path, cache_dir: Path, vllm_python: str, vllm_vars: dict[str, str]) -> Iterator[str]:
    """Both critics on one vLLM engine, with structured outputs on; a context of 3072 tokens, the least the
    server takes for small images (a 256 x 256 pixel budget), its templates and a 512-token answer, so a long
    prompt passes the server's checks but not vLLM's; no cache of identical calls in front."""
    path = str(vllm_checkpoint)
    args = ("--edit-model", path, "--gen-model", path, *CPU_FLAGS, "--structured-outputs", "--cache-size", "0")
    args += ("--max-model-len", "3072", "--image-pixel-budget", str(256 * 256), "--gen-max-new-tokens", "512")
    with running_server(cache_dir, *args, tiny=False, timeout=600, python=vllm_python, env=vllm_vars) as url:
        yield url


def _edit_item(edited: str = "red", instruction: str = "Make the square red.") -> dict[str, str]:
    return {"source": b64("blue"), "edited": b64(edited), "instruction": instruction}


def _gen_item(image: str = "red", prompt: str = "a red square") -> dict[str, str]:
    return {"image": b64(image), "prompt": prompt}


def _dimensions(result: dict) -> list[dict]:
    return [v for v in result.values() if isinstance(v, dict) and "score" in v]


def test_the_four_routes_score_with_expected_values(vllm_url: str) -> None:
    client = httpx.Client(base_url=vllm_url, timeout=300)
    models = client.get("/v1/models").json()["models"]
    assert {m["engine"] for m in models} == {"vllm"}
    expected = {"score_mode": "expected"}
    group = {"source": b64("blue"), "instruction": "Make the square red.", "candidates": [b64("red"), b64("blue")]}
    responses = {
        "edit": client.post("/v1/edit/score", json={"items": [_edit_item()], **expected}),
        "edit group": client.post("/v1/edit/score_group", json={**group, **expected}),
        "gen": client.post("/v1/gen/score", json={"items": [_gen_item()], **expected}),
        "gen group": client.post(
            "/v1/gen/score_group", json={"prompt": "a red square", "images": [b64("red"), b64("green")], **expected}
        ),
    }
    for route, response in responses.items():
        assert response.status_code == 200, (route, response.text)
        for result in response.json()["results"]:
            assert result["error"] is None, (route, result)
            assert result["reward"] is not None
            for dimension in _dimensions(result):  # from the probabilities vLLM gave the watched digits
                assert dimension["expected"] is not None and 1.0 <= dimension["expected"] <= 5.0, (route, dimension)


async def _concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return list(await asyncio.gather(*(client.post("/v1/edit/score", json=b) for b in bodies)))


def test_concurrent_requests_are_batched_by_vllm_itself(vllm_url: str) -> None:
    before = httpx.get(f"{vllm_url}/metrics").text
    # new instructions, so the server's cache of identical calls answers none of them
    bodies = [{"items": [_edit_item(instruction=f"Make the square red ({uuid.uuid4().hex}).")]} for _ in range(8)]
    responses = asyncio.run(_concurrently(vllm_url, bodies))
    assert all(r.status_code == 200 and r.json()["results"][0]["reward"] is not None for r in responses)
    after = httpx.get(f"{vllm_url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    # no micro-batcher in front: each request's two judge calls reach the engine as they come
    assert delta("firm_engine_batch_size_sum") == 2 * delta("firm_engine_batch_size_count") == 16
    # and vLLM ran calls of different requests together: some engine step held more than one request's two
    steps = delta("firm_vllm_running_requests_count")
    assert steps > 0 and steps - delta("firm_vllm_running_requests_bucket", le="2.0") > 0


def test_the_engine_resolves_the_step_limits_of_offline_llm_not_an_embedded_engines(
    vllm_url: str, vllm_checkpoint: Path, vllm_python: str, vllm_vars: dict[str, str]
) -> None:
    """A reward server scores batches: its engine gets `LLM`'s step limits, not the smaller ones vLLM gives an
    embedded engine, and /metrics says which it runs with. (The fixture's context, 3072 tokens, is below
    both token budgets, so vLLM clamps neither.)"""
    code = (
        "from vllm.config import SchedulerConfig as C; from vllm.engine.arg_utils import EngineArgs; "
        "from vllm.usage.usage_lib import UsageContext as U; t, s = EngineArgs.get_batch_defaults(1); "
        "print(s[U.LLM_CLASS], t[U.LLM_CLASS], s.get(U.ENGINE_CONTEXT, C.DEFAULT_MAX_NUM_SEQS), "
        "t.get(U.ENGINE_CONTEXT, C.DEFAULT_MAX_NUM_BATCHED_TOKENS))"
    )
    done = subprocess.run(
        [vllm_python, "-c", code], env={**os.environ, **vllm_vars}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seqs, tokens, embedded_seqs, embedded_tokens = map(int, done.stdout.split()[-4:])
    assert (seqs, tokens) != (embedded_seqs, embedded_tokens), "vLLM's defaults no longer tell the two apart"
    page = httpx.get(f"{vllm_url}/metrics").text
    model = str(vllm_checkpoint)
    assert metric_value(page, "firm_vllm_max_num_seqs", model=model) == seqs
    assert metric_value(page, "firm_vllm_max_num_batched_tokens", model=model) == tokens


def test_the_prefix_cache_serves_a_group_scored_again(vllm_url: str) -> None:
    """A group's calls share the source image, and each candidate's two calls share the rubric's opening.
    Within one round they run in the same engine step, before anything is cached; a second scoring of
    the group (a trainer's retry, an evaluation pass) finds their prompts' blocks cached. The tiny
    critic's images are 4 tokens, too few to fill a block (128 tokens on CPU) with the source alone."""
    hits = "firm_vllm_prefix_cache_hits_total"
    body = {
        "source": encode(draw_square("blue"), "PNG"),
        "instruction": "Make the square red.",
        "candidates": [b64("red"), b64("orange")],
    }
    counts = []
    for _ in range(2):
        before = metric_value(httpx.get(f"{vllm_url}/metrics").text, hits)
        response = httpx.post(f"{vllm_url}/v1/edit/score_group", json=body, timeout=300)
        assert response.status_code == 200, response.text
        counts.append(metric_value(httpx.get(f"{vllm_url}/metrics").text, hits) - before)
    assert counts[1] > counts[0]


def test_a_call_vllm_refuses_fails_its_item_alone(vllm_url: str) -> None:
    # the longest prompt allowed, in characters the tiny tokenizer never merged (a token per byte): over the context
    prompt = ("a red square " + "猫" * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]
    long_item = {**_gen_item(prompt=prompt), "id": "long"}
    body = {"items": [{**_gen_item(), "id": "ok"}, long_item]}
    response = httpx.post(f"{vllm_url}/v1/gen/score", json=body, timeout=300)
    assert response.status_code == 200, response.text
    ok, long = GenScoreResponse.model_validate(response.json()).results
    assert ok.error is None and ok.reward is not None
    assert long.reward is None and long.error is not None and long.error.code == "engine_error"
    assert "vllm refused" in long.error.message
    assert httpx.get(f"{vllm_url}/readyz").status_code == 200  # one refusal is not an unhealthy engine


def test_greedy_answers_equal_the_transformers_engines(vllm_url: str, vllm_checkpoint: Path, cache_dir: Path) -> None:
    path = str(vllm_checkpoint)
    args = ("--engine", "transformers", "--device", "cpu", "--dtype", "float32")
    requests = [
        ("/v1/edit/score", {"items": [_edit_item(), _edit_item("blue", "Paint the square orange.")]}),
        ("/v1/gen/score", {"items": [_gen_item(), _gen_item("purple", "a green square")]}),
    ]
    options = {"score_mode": "expected", "return_reasoning": True}
    with running_server(cache_dir, *args, "--edit-model", path, "--gen-model", path, tiny=False) as hf_url:
        for route, body in requests:
            hf, vl = (httpx.post(f"{url}{route}", json={**body, **options}, timeout=300) for url in (hf_url, vllm_url))
            assert hf.status_code == vl.status_code == 200, (hf.text, vl.text)
            for a, b in zip(hf.json()["results"], vl.json()["results"], strict=True):
                assert a["error"] is None and b["error"] is None, (a, b)
                for da, db in zip(_dimensions(a), _dimensions(b), strict=True):
                    assert (da["score"], da["reasoning"]) == (db["score"], db["reasoning"])  # the same greedy text
                    assert da["expected"] == pytest.approx(db["expected"], abs=0.05)


def test_health_answers_while_vllm_loads(
    vllm_checkpoint: Path, cache_dir: Path, vllm_python: str, vllm_vars: dict[str, str]
) -> None:
    """Liveness probes keep answering during the load, so an orchestrator does not restart a loading server."""
    port = free_port()
    path = str(vllm_checkpoint)
    cmd = [vllm_python, "-m", "server.cli", "--cache-dir", str(cache_dir), "--port", str(port), *CPU_FLAGS]
    # a pixel budget whose derived context fits the tiny critic's 32,768 positions
    cmd += ["--edit-model", path, "--gen-model", "none", "--image-pixel-budget", str(2048 * 2048)]
    process = subprocess.Popen(
        cmd, env={**os.environ, **vllm_vars}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + 300
        while (200, 200) not in seen and time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
                seen.add((health, httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code))
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert (200, 503) in seen and (200, 200) in seen, seen  # alive while loading, then ready
