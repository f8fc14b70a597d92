"""Prompt sources: the release's prompt files fetched over HTTP (a local server stands in for the
release), verified by digest, cached for offline starts, and rendered exactly as the release renders.

The fixture files (tests/fixtures/release) have the release's layout and Python form but text of
this project's own; their digests differ from the release's, which the drift tests rely on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from server.prompts.pysource import SourceError, constant, constants
from server.prompts.release import EDIT_FILE, GEN_FILE, PINNED, PromptSource, PromptSourceError
from server.prompts.sets import FIRM, OWN, RECORD_FILE, ReleasedPrompts, chosen_set, judges_for
from server.settings import Settings

FIXTURE = Path(__file__).parent / "fixtures" / "release"
FIXTURE_PINS = {path: hashlib.sha256((FIXTURE / path).read_bytes()).hexdigest() for path in PINNED}
ALL = ("edit_execution", "edit_consistency", "gen_instruction_following", "gen_quality")


def _module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fixture_prompts", FIXTURE / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Files(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def release_url() -> Iterator[tuple[str, list[str]]]:
    """The fixture release served over HTTP on loopback; yields its base URL and the paths requested."""
    requested: list[str] = []

    class Recording(_Files):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Recording, directory=str(FIXTURE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- reading the files


def test_string_constants_are_read_without_running_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = f'import pathlib\npathlib.Path({str(marker)!r}).write_text("x")\nA = "a" "b"\nB = (A\n  + "c")\n'
    assert constants(source) == {"A": "ab", "B": "abc"}
    assert not marker.exists()


def test_a_constant_built_from_anything_but_strings_is_refused() -> None:
    source = 'import os\nA = os.environ.get("X", "")\nB = "x" * 3\nC = "ok"\n'
    assert constants(source) == {"C": "ok"}
    with pytest.raises(SourceError, match="defines no string constant A"):
        constant(source, "A")


def test_the_fixture_reads_as_python_would_evaluate_it() -> None:
    edit, gen = _module(EDIT_FILE.path), _module(GEN_FILE.path)
    text = (FIXTURE / GEN_FILE.path).read_text()
    assert constant(text, "SCORE") == gen.SCORE
    assert constant(text, "Quality_PROMPT") == gen.Quality_PROMPT
    assert constant((FIXTURE / EDIT_FILE.path).read_text(), "SCORE_EXECUTION") == edit.SCORE_EXECUTION


# ----------------------------------------------------------------------------- fetch, verify, cache


def test_pull_caches_the_files_and_a_later_start_needs_no_network(
    release_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, requested = release_url
    source = PromptSource(url, tmp_path, pins=FIXTURE_PINS)
    pulled = source.pull()
    assert sorted(f.path for f in pulled) == sorted(PINNED) and all(f.verified for f in pulled)
    assert len(requested) == 2
    offline = PromptSource(url, tmp_path, pins=FIXTURE_PINS)
    prompts = offline.prompts(ALL)
    assert len(requested) == 2  # answered from the cache
    assert prompts["edit_execution"].text == _module(EDIT_FILE.path).SCORE_EXECUTION
    assert prompts["gen_quality"].origin.endswith(f"{GEN_FILE.path}#Quality_PROMPT")
    assert prompts["gen_instruction_following"].sha256 == FIXTURE_PINS[GEN_FILE.path]


def test_a_file_that_differs_from_its_pinned_digest_is_refused_by_name(
    release_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = release_url
    with pytest.raises(PromptSourceError, match=f"refusing {EDIT_FILE.path}.*--allow-prompt-drift"):
        PromptSource(url, tmp_path).prompts(["edit_execution"])
    assert not list(tmp_path.rglob("prompt_template.py"))  # a refused file is not cached


def test_a_damaged_cached_copy_is_refused_with_the_way_to_fetch_it_again(
    release_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = release_url
    source = PromptSource(url, tmp_path, pins=FIXTURE_PINS)
    source.pull()
    cached = source.cache / EDIT_FILE.path
    cached.write_text(cached.read_text() + "# damaged\n")
    with pytest.raises(PromptSourceError, match="run `firm-serve prompts pull` to fetch it again"):
        PromptSource(url, tmp_path, pins=FIXTURE_PINS).prompts(["edit_execution"])
    assert PromptSource(url, tmp_path, pins=FIXTURE_PINS).pull()[0].verified  # pull mends it


def test_drift_can_be_allowed_and_is_reported(release_url: tuple[str, list[str]], tmp_path: Path) -> None:
    url, _ = release_url
    prompts = PromptSource(url, tmp_path, allow_drift=True).prompts(ALL)
    assert {p.verified for p in prompts.values()} == {False}
    assert prompts["edit_consistency"].text == _module(EDIT_FILE.path).SCORE_CONSISTENCY


def test_an_unreachable_source_says_how_to_get_the_prompts(tmp_path: Path) -> None:
    from tests.support import free_port

    with pytest.raises(PromptSourceError, match=r"firm-serve prompts pull.*--prompt-source"):
        PromptSource(f"http://127.0.0.1:{free_port()}", tmp_path).prompts(["gen_quality"])
    with pytest.raises(PromptSourceError, match="cannot read"):
        PromptSource(str(tmp_path / "nowhere"), tmp_path).prompts(["gen_quality"])


def test_a_local_checkout_is_read_in_place(tmp_path: Path) -> None:
    prompts = PromptSource(str(FIXTURE), tmp_path, pins=FIXTURE_PINS).prompts(["edit_execution"])
    assert prompts["edit_execution"].verified
    assert not (tmp_path / "prompts").exists()  # nothing to cache


# ----------------------------------------------------------------------------- which prompts a model gets


def test_released_checkpoints_get_the_release_prompts_and_other_models_our_own(tmp_path: Path) -> None:
    assert chosen_set("auto", "VisionXLab/FIRM-Edit-8B") == FIRM
    assert chosen_set("auto", str(tmp_path)) == OWN
    assert chosen_set("firm", str(tmp_path)) == FIRM
    with pytest.raises(ValueError, match="expected auto, firm, own or a directory of templates, got 'mine'"):
        Settings(prompts="mine")


def test_other_prompts_for_a_released_checkpoint_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert chosen_set("own", "VisionXLab/FIRM-Gen-8B") == OWN
    assert "trained on the release's prompts" in caplog.text


def test_a_trained_critic_gets_the_prompts_it_recorded(tmp_path: Path) -> None:
    released = ReleasedPrompts(PromptSource(str(FIXTURE), tmp_path, pins=FIXTURE_PINS))
    (tmp_path / RECORD_FILE).write_text(json.dumps({"prompts": "firm"}))
    judges = judges_for(str(tmp_path), ["edit_execution"], "auto", released)
    assert judges["edit_execution"].text == _module(EDIT_FILE.path).SCORE_EXECUTION
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "edit_execution.txt").write_text("Mine: {prompt}")
    (tmp_path / RECORD_FILE).write_text(json.dumps({"prompts": "templates"}))
    judges = judges_for(str(tmp_path), ["edit_execution", "edit_consistency"], "auto", released)
    assert judges["edit_execution"].render(instruction="go") == "Mine: go"
    assert judges["edit_consistency"].origin == "packaged edit_consistency.txt"


def test_the_release_is_only_fetched_when_a_model_needs_it(tmp_path: Path) -> None:
    def unreachable(names: object) -> dict:
        raise AssertionError("the release was fetched for a model that does not use it")

    judges = judges_for(str(tmp_path), list(ALL), "auto", unreachable)
    assert set(judges) == set(ALL)


# ----------------------------------------------------------------------------- firm-serve prompts


def _prompts_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "prompts", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_prompts_show_prints_exactly_what_the_release_renders(tmp_path: Path) -> None:
    edit, gen = _module(EDIT_FILE.path), _module(GEN_FILE.path)
    common = ("--prompt-source", str(FIXTURE), "--allow-prompt-drift", "--cache-dir", str(tmp_path), "--json")
    result = _prompts_cli("show", *common, "--instruction", "Make the car red.", "--prompt", "a red car")
    assert result.returncode == 0, result.stderr
    shown = {row["judge"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert shown["edit_execution"]["text"] == edit.SCORE_EXECUTION.format(prompt="Make the car red.", requirement="")
    assert shown["edit_consistency"]["text"] == edit.SCORE_CONSISTENCY.format(
        prompt="Make the car red.", requirement=""
    )
    assert shown["gen_instruction_following"]["text"] == gen.SCORE.format(prompt="a red car", requirement="")
    assert shown["gen_quality"]["text"] == gen.Quality_PROMPT  # sent as written: single braces
    assert shown["gen_quality"]["sha256"] == FIXTURE_PINS[GEN_FILE.path]
    assert [row["max_new_tokens"] for row in shown.values()] == [256, 256, 8192, 8192]
    result = _prompts_cli(
        "show", *common, "--judge", "gen_instruction_following", "--prompt", "a cat", "--requirement", "no dogs"
    )
    [row] = map(json.loads, result.stdout.splitlines())
    assert row["text"] == gen.SCORE.format(prompt="a cat", requirement="no dogs")


def test_prompts_pull_refuses_drift_by_name_and_exits_non_zero(
    release_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = release_url
    result = _prompts_cli("pull", "--prompt-source", url, "--cache-dir", str(tmp_path))
    assert result.returncode != 0
    assert EDIT_FILE.path in result.stderr and "--allow-prompt-drift" in result.stderr
    assert "Traceback" not in result.stderr
    result = _prompts_cli("pull", "--prompt-source", url, "--cache-dir", str(tmp_path), "--allow-prompt-drift")
    assert result.returncode == 0, result.stderr
    assert "DRIFT" in result.stdout and "cached in" in result.stdout


def test_pull_to_a_folder_makes_a_copy_that_serves_as_a_source(
    release_url: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = release_url
    copy = tmp_path / "copy"
    result = _prompts_cli(
        "pull", "--prompt-source", url, "--cache-dir", str(tmp_path), "--allow-prompt-drift", "--to", str(copy)
    )
    assert result.returncode == 0, result.stderr
    for path in PINNED:
        assert (copy / path).read_bytes() == (FIXTURE / path).read_bytes()
    assert PromptSource(str(copy), tmp_path, pins=FIXTURE_PINS).prompts(ALL)["gen_quality"].verified


def test_prompts_commands_take_the_servers_settings_but_bind_nothing(tmp_path: Path) -> None:
    """A public FIRM_HOST without keys (as in the Docker image) is no reason to refuse to show a prompt, and
    the flags that change what a judge is sent are taken."""
    mine = tmp_path / "execution.txt"
    mine.write_text("Mine: {prompt}")
    args = ("show", "--json", "--prompts", "own", "--edit-execution-template", str(mine), "--edit-max-new-tokens", "64")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "prompts", *args, "--judge", "edit_execution", "--instruction", "go"],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "FIRM_HOST": "0.0.0.0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = map(json.loads, result.stdout.splitlines())
    assert (row["text"], row["max_new_tokens"], row["source"]) == ("Mine: go", 64, str(mine))


def test_a_server_that_cannot_have_the_release_prompts_refuses_to_start(tmp_path: Path) -> None:
    from tests.support import free_port

    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "--gen-model", "none", "--cache-dir", str(tmp_path),
         "--prompt-source", f"http://127.0.0.1:{free_port()}", "--port", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "firm-serve prompts pull" in result.stderr and "--prompt-source" in result.stderr
    assert "Traceback" not in result.stderr
