"""A small OpenAI-compatible chat-completions server for the tests of the openai engine.

The real `vllm serve` runs in tests/vllm; this stub covers what a real server can't be made to
do on demand. It answers each judge prompt with a canned answer in the released format and
per-token log-probabilities (every character is a token, except that a character of several
UTF-8 bytes comes as one piece per byte, shown as U+FFFD the way vLLM shows them), and it can be
told to fail (HTTP 503) or to answer slowly. It records what it was sent.

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

from server.judges.answers import alignment_answer, json_score_answer, quality_answer

# "café" and "naïve": characters split over two tokens before the score
EDIT_ANSWER = json_score_answer("The café sign is red, as the naïve instruction asks.", 4)
GEN_ANSWER = alignment_answer([("A red square", "Met.")], "Everything the prompt asks for is there.", 5)
QUALITY_ANSWER = quality_answer((4, 3, 5), "Clean and sharp.")
PIECE = "\ufffd"  # how vLLM shows one token that holds part of a character
# probabilities of the digit tokens at a score position, centred on the written digit
SPREAD = {0: 0.7, -1: 0.2, 1: 0.1}


def answer_for(images: int, text: str) -> str:
    if images == 2:
        return EDIT_ANSWER
    if "boxed" in text:
        return GEN_ANSWER
    return QUALITY_ANSWER


def logprobs_for(answer: str) -> list[dict[str, Any]]:
    content = []
    for char in answer:
        pieces = len(char.encode())
        if pieces > 1:
            content += [{"token": PIECE, "logprob": 0.0, "bytes": list(PIECE.encode()), "top_logprobs": []}] * pieces
            continue
        top = [{"token": char, "logprob": 0.0}]
        if char.isdigit():
            digit = int(char)
            top = [{"token": str(digit + d), "logprob": math.log(p)} for d, p in SPREAD.items() if 1 <= digit + d <= 5]
        content.append({"token": char, "logprob": top[0]["logprob"], "bytes": list(char.encode()), "top_logprobs": top})
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
        parts = body["messages"][0]["content"]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        answer = answer_for(sum(p["type"] == "image_url" for p in parts), text)
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
