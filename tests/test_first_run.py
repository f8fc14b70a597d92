"""What a newcomer meets first: a body that is not JSON, a prompt pull with no route, the README's quick start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

NOT_JSON: dict[str, tuple[bytes, str]] = {
    "a bare word": (b"items", "the body is not valid JSON: Expecting value at line 1, column 1"),
    "a cut-off object": (b'{"items": [', "the body is not valid JSON: Expecting value at line 1, column 12"),
    "a missing comma on line 2": (
        b'{"items": [\n  {"image": "x" "prompt": "p"}]}',
        "the body is not valid JSON: Expecting ',' delimiter at line 2, column 17",
    ),
    "not UTF-8": (b'{"items": "\xff\xfe"}', "the body is not valid JSON: it is not UTF-8 text"),
}


@pytest.mark.parametrize("name", list(NOT_JSON))
def test_a_body_that_is_not_json_gets_a_400_that_says_where(server_url: str, name: str) -> None:
    body, says = NOT_JSON[name]
    response = httpx.post(
        f"{server_url}/v1/gen/score", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["message"].startswith(says), error["message"]


def test_a_body_that_is_json_but_breaks_the_schema_is_still_a_422(server_url: str) -> None:
    response = httpx.post(f"{server_url}/v1/gen/score", json={"items": [{"prompt": 7}]}, timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def _firm_serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_prompts_pull_with_no_route_says_what_it_could_not_reach_and_what_else_to_do(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    result = _firm_serve("prompts", "pull", "--prompt-source", closed, "--cache-dir", str(tmp_path))
    assert result.returncode != 0
    said = result.stderr
    assert f"could not reach {closed}/" in said, said
    assert "--prompt-source" in said and "prompts pull --to" in said and "--tiny" in said, said
    assert "run `firm-serve prompts pull`" not in said and "Traceback" not in said, said


def test_a_server_start_with_no_route_to_the_prompts_offers_the_pull_and_tiny(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    result = _firm_serve("--gen-model", "none", "--prompt-source", closed, "--cache-dir", str(tmp_path), "--port", "0")
    assert result.returncode != 0
    said = result.stderr
    assert f"could not reach {closed}/" in said, said
    assert "run `firm-serve prompts pull`" in said and "--prompt-source" in said and "--tiny" in said, said
