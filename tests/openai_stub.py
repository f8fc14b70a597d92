"""A small OpenAI-compatible chat-completions server for the tests of the openai engine.

It stands in for `vllm serve`, which cannot run here. It answers each judge prompt with a
canned, well-formed answer and per-token log-probabilities (every character is a token), and
it can be told to fail (HTTP 503) or to answer slowly. It records what it was sent.

    python -m tests.openai_stub --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

EDIT_ANSWER = '{"reasoning": "The edit is carried out.", "score": [4]}'
GEN_ANSWER = "Everything the prompt asks for is there. \\boxed{5}"
QUALITY_ANSWER = '{"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}'
# probabilities of the digit tokens at a score position, centred on the written digit
SPREAD = {0: 0.7, -1: 0.2, 1: 0.1}


def answer_for(text: str) -> str:
    if "Editing instruction" in text:
        return EDIT_ANSWER
    if "boxed" in text:
        return GEN_ANSWER
    return QUALITY_ANSWER


def logprobs_for(answer: str) -> list[dict[str, Any]]:
    content = []
    for char in answer:
        top = [{"token": char, "logprob": 0.0}]
        if char.isdigit():
            digit = int(char)
            top = [{"token": str(digit + d), "logprob": math.log(p)} for d, p in SPREAD.items() if 1 <= digit + d <= 5]
        content.append({"token": char, "logprob": top[0]["logprob"], "top_logprobs": top})
    return content


def create_app() -> FastAPI:
    app = FastAPI()
    app.state.mode = {"fail": False, "delay": 0.0}
    app.state.bodies = []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.post("/control")
    async def control(request: Request) -> dict[str, Any]:
        app.state.mode.update(await request.json())
        return app.state.mode

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"requests": len(app.state.bodies), "last": app.state.bodies[-1] if app.state.bodies else None}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        app.state.bodies.append(body)
        await asyncio.sleep(app.state.mode["delay"])
        if app.state.mode["fail"]:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        text = " ".join(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        answer = answer_for(text)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
            "logprobs": {"content": logprobs_for(answer)},
        }
        return JSONResponse(
            {"id": "cmpl-stub", "object": "chat.completion", "model": body["model"], "choices": [choice]}
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
