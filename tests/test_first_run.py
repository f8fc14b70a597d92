"""What a newcomer meets first: a body that is not JSON, a prompt pull with no route, the README's quick start."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
README_URL = "localhost:8000"  # where the README's examples send: the only thing the test changes in them

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


def _readme_block(language: str, holding: str) -> str:
    """The README's one fenced `language` block that holds `holding`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", (ROOT / "README.md").read_text(), re.DOTALL | re.MULTILINE)
    [block] = [b for b in blocks if holding in b]
    assert README_URL in block
    return block


def test_the_example_images_are_the_ones_the_script_makes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_images.py"), "--to", str(tmp_path)], check=True)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["edited.png", "generated.png", "source.png"]
    for name in made:
        shipped = ROOT / "examples" / name
        assert shipped.stat().st_size < 8_000
        with Image.open(shipped) as ours, Image.open(tmp_path / name) as again:
            assert ours.size == (256, 256) and ours.tobytes() == again.tobytes()


def test_the_readme_curl_example_runs_as_written(server_url: str) -> None:
    block = _readme_block("bash", "curl").replace(README_URL, server_url.removeprefix("http://"))
    result = subprocess.run(["bash", "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    reply = json.loads(result.stdout)  # an error body would carry "error" and no results
    [item] = reply["results"]
    assert item["error"] is None and 0.0 <= item["reward"] <= 1.0, reply
    assert item["execution"]["reasoning"]  # the block asks for the reasoning


_SHOW = "import json, sys; json.dump({'advantages': advantages, 'mask': mask, 'rewards': rewards}, sys.stderr)"


def test_the_readme_python_example_runs_as_written(server_url: str) -> None:
    block = _readme_block("python", "RewardClient").replace(f"http://{README_URL}", server_url)
    command = [sys.executable, "-c", f"{block}\n{_SHOW}"]  # after the block: what it left, for the checks
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stderr.strip().splitlines()[-1])
    assert len(seen["advantages"]) == 2 and seen["mask"] == [True, True], seen
    assert len(seen["rewards"]) == 1 and not math.isnan(seen["rewards"][0]), seen
    assert result.stdout.strip()  # the block prints what it got
