"""Sleep and wake over HTTP: the GPU-sharing switch, behind the admin key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import b64, running_server

KEY = "admin-secret"


@pytest.fixture(scope="module")
def admin_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    with running_server(cache_dir, "--admin-key", KEY) as url:
        yield url


def _score(url: str) -> httpx.Response:
    body = {"items": [{"image": b64("red"), "prompt": "a red square"}]}
    return httpx.post(f"{url}/v1/gen/score", json=body, timeout=60)


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}"])
def test_admin_routes_need_the_admin_key(admin_url: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.post(f"{admin_url}/v1/admin/sleep", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{admin_url}/readyz").json()["ready"] is True


def test_sleep_refuses_scoring_with_retry_after_until_wake(admin_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    slept = httpx.post(f"{admin_url}/v1/admin/sleep", headers=auth, timeout=60)
    assert slept.status_code == 200
    assert slept.json() == {"models": {"edit": "sleeping", "gen": "sleeping"}}
    ready = httpx.get(f"{admin_url}/readyz")
    assert ready.status_code == 503 and ready.json()["models"]["gen"] == "sleeping"
    refused = _score(admin_url)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "not_ready"
    assert int(refused.headers["Retry-After"]) > 0

    woke = httpx.post(f"{admin_url}/v1/admin/wake", headers=auth, timeout=60)
    assert woke.json() == {"models": {"edit": "ready", "gen": "ready"}}
    assert httpx.get(f"{admin_url}/readyz").status_code == 200
    scored = _score(admin_url)
    assert scored.status_code == 200 and scored.json()["results"][0]["reward"] is not None


def test_admin_routes_are_off_without_a_key(server_url: str) -> None:
    response = httpx.post(f"{server_url}/v1/admin/sleep", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "admin_off"
