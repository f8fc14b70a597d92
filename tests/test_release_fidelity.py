"""A released checkpoint served end to end: `firm-serve` started with the release's two prompt files as
`--prompt-source` sends each judge, byte for byte, the text the release renders, and scores answers in
every format the released critics write.

The critic is remote (`--engine openai`): a small OpenAI-compatible server in this test stands in
for `vllm serve` with the released weights, which cannot run here. It records what it is sent and
answers as the released critics do. The prompt files are the fixture in the release's layout.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from tests.support import b64, free_port, running_server
from tests.test_prompts import EDIT_FILE, FIXTURE, GEN_FILE, _module

# the answers, keyed by the first words of the fixture prompt they answer (each a released format or fallback)
ANSWERS = {
    "Fixture execution judge": '```json\n{\n"reasoning" : "The car is red now.",\n"score" : [4]\n}\n```',
    "Fixture consistency judge": '{\n"reasoning" : "The wheels changed too",\n"score" : [3',  # cut off
    "Fixture alignment judge": (
        "Let's evaluate the image against the Original Prompt:\n\n1. **Identified Requirement 1: a red car**:\n"
        "- The car is red.\n\n**Final Analysis**:\nThe car is red; the street is missing.\n\n"
        "**Final Alignment Rating: 4**\n\\boxed{[4]}"
    ),
    "Fixture quality judge": '{\n  "score" : [4, 3, 5],\n  "reasoning" : "Sharp, slightly flat colours."\n}',
}


def _logprobs(answer: str) -> list[dict[str, Any]]:
    """One token per character; at a digit, most of the mass on it and some on its neighbours."""
    content = []
    for char in answer:
        top = [{"token": char, "logprob": 0.0}]
        if char in "12345":
            d = int(char)
            top = [{"token": str(d), "logprob": math.log(0.8)}]
            top += [{"token": str(n), "logprob": math.log(0.1)} for n in (d - 1, d + 1) if 1 <= n <= 5]
        content.append({"token": char, "logprob": top[0]["logprob"], "top_logprobs": top})
    return content


def _critic_app(sent: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict[str, Any]:
        body = await request.json()
        sent.append(body)
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        answer = next(a for key, a in ANSWERS.items() if text.lstrip().startswith(key))
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        choice["logprobs"] = {"content": _logprobs(answer)}
        return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}

    return app


@pytest.fixture
def critic() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    sent: list[dict[str, Any]] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_critic_app(sent), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", sent
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _texts(sent: list[dict[str, Any]]) -> list[str]:
    return [next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text") for body in sent]


def test_the_released_prompts_are_sent_byte_for_byte_and_every_released_format_scores(
    critic: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, sent = critic
    edit, gen = _module(EDIT_FILE.path), _module(GEN_FILE.path)
    args = ["--engine", "openai", "--openai-base-urls", url, "--prompt-source", str(FIXTURE), "--allow-prompt-drift"]
    # no canaries: every prompt the critic records is one of the requests' below
    with running_server(tmp_path, *args, "--no-canaries", tiny=False) as server:
        cards = httpx.get(f"{server}/v1/models").json()["models"]
        edit_body = {
            "items": [{"source": b64("blue"), "edited": b64("red"), "instruction": "Make the car red."}],
            "return_reasoning": True,
        }
        edited = httpx.post(f"{server}/v1/edit/score", json=edit_body, timeout=60).json()
        gen_body = {
            "items": [{"image": b64("red"), "prompt": "a red car on a street"}],
            "score_mode": "expected",
            "return_reasoning": True,
        }
        generated = httpx.post(f"{server}/v1/gen/score", json=gen_body, timeout=60).json()

    # the released checkpoints get the release's prompts, rendered as the release renders them
    assert sorted(_texts(sent)) == sorted(
        [
            edit.SCORE_EXECUTION.format(prompt="Make the car red.", requirement=""),
            edit.SCORE_CONSISTENCY.format(prompt="Make the car red.", requirement=""),
            gen.SCORE.format(prompt="a red car on a street", requirement=""),
            gen.Quality_PROMPT,
        ]
    )
    budgets = sorted(body["max_completion_tokens"] for body in sent)
    assert budgets == [256, 256, 8192, 8192]
    judges = {j["name"]: j for card in cards for j in card["judges"]}
    assert judges["edit_execution"]["prompt_source"].endswith(f"{EDIT_FILE.path}#SCORE_EXECUTION")
    assert judges["gen_quality"]["prompt_verified"] is False  # the fixture is not the release: drift allowed

    (item,) = edited["results"]
    assert item["error"] is None
    assert (item["execution"]["score"], item["consistency"]["score"]) == (4, 3)  # fenced; cut off after the score
    assert item["execution"]["reasoning"] == "The car is red now."
    assert item["reward"] == pytest.approx(0.75 * (0.6 + 0.4 * 0.5))
    (item,) = generated["results"]
    assert item["error"] is None
    following, quality = item["instruction_following"], item["quality"]
    assert following["score"] == 4 and following["reasoning"] == "The car is red; the street is missing."
    assert following["expected"] == pytest.approx(0.1 * 3 + 0.8 * 4 + 0.1 * 5)
    assert quality["subscores"] == {"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}
    assert quality["score"] == 3 and quality["expected"] == pytest.approx(3.0)
    assert item["reward"] == pytest.approx((following["expected"] - 1) / 4 * (0.4 + 0.6 * 0.5))
