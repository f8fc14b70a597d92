"""An OpenAI-compatible chat server standing in for the curation pipelines' teacher models.

It answers by model name, so each pipeline step gets its own canned reply: "describer" lists
differences, "grader" grades (execution N and consistency 6 - N, N read from "score=N" in the
prompt), "planner" writes a checklist, "checker" checks it and rates N. It can be told to fail:
the next k calls answer 503, a prompt containing ALWAYS_FAIL always answers 500, one containing
GARBLE gets a reply without JSON, one containing BADGZIP a body that claims gzip but is not, one
containing LONG a grade whose reasoning runs to 800 characters. It records every call (model,
text, image hashes) and counts tokens in `usage`. It runs in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.support import free_port

PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode("ascii")).hexdigest()[:16]


def _score(text: str) -> int:
    found = re.search(r"score=(\d)", text)
    return int(found.group(1)) if found else 3


def canned_answer(model: str, text: str) -> str:
    if "GARBLE" in text:
        return "I would rather not say."
    n = _score(text)
    if model == "describer":
        return "1. The square in the centre changed colour.\n2. Nothing else differs."
    if model == "grader":
        reasoning = f"The requested change is visible (grade {n})."
        if "LONG" in text:
            reasoning = " ".join([reasoning] * 20)[:800]
        grades = {
            "execution": {"reasoning": reasoning, "score": n},
            "consistency": {"reasoning": "The background is untouched.", "score": [6 - n]},
        }
        return "Here is my grading:\n```json\n" + json.dumps(grades) + "\n```"
    if model == "planner":
        return json.dumps({"checklist": ["a square", "the square has the asked colour"]})
    if model == "checker":
        checks = [
            {"item": "a square", "verdict": "met", "note": "a square is in the centre"},
            {"item": "the square has the asked colour", "verdict": "partly met" if n < 5 else "met"},
        ]
        return json.dumps({"checks": checks, "score": str(n)})
    raise ValueError(f"the stub serves no model {model!r}")


def create_app() -> FastAPI:
    app = FastAPI()
    app.state.control = {"fail_next": 0, "delay": 0.0}
    app.state.calls = []

    @app.post("/control")
    async def control(request: Request) -> dict[str, Any]:
        app.state.control.update(await request.json())
        return app.state.control

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        content = body["messages"][0]["content"]
        text = " ".join(p["text"] for p in content if p["type"] == "text")
        images = [url_digest(p["image_url"]["url"]) for p in content if p["type"] == "image_url"]
        app.state.calls.append({"model": body["model"], "text": text, "images": images})
        await asyncio.sleep(app.state.control["delay"])
        if app.state.control["fail_next"] > 0:
            app.state.control["fail_next"] -= 1
            return JSONResponse({"error": {"message": "busy"}}, status_code=503, headers={"Retry-After": "0"})
        if "ALWAYS_FAIL" in text:
            return JSONResponse({"error": {"message": "internal error"}}, status_code=500)
        if "BADGZIP" in text:
            return Response(b"not gzip at all", media_type="application/json", headers={"Content-Encoding": "gzip"})
        choice = {"index": 0, "message": {"role": "assistant", "content": canned_answer(body["model"], text)}}
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
        return JSONResponse({"id": "stub", "object": "chat.completion", "choices": [choice], "usage": usage})

    return app


class StubServer:
    """The stub on a free port in a background thread; `url` ends in /v1."""

    def __init__(self) -> None:
        self.app = create_app()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="curation-stub", daemon=True)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.app.state.calls

    def reset(self, **control: Any) -> None:
        self.app.state.calls.clear()
        self.app.state.control.update({"fail_next": 0, "delay": 0.0, **control})

    def __enter__(self) -> StubServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the curation stub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
