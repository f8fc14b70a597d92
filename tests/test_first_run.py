"""What a newcomer meets first: a body that is not JSON, a prompt pull with no route, the README's quick start."""

from __future__ import annotations

import httpx
import pytest

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
