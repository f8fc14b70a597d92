from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import load_settings
from server.settings import Settings


def test_defaults_serve_both_firm_critics_on_loopback() -> None:
    settings = load_settings([])
    assert (settings.edit_model, settings.gen_model) == ("VisionXLab/FIRM-Edit-8B", "VisionXLab/FIRM-Gen-8B")
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert (settings.score_mode, settings.edit_max_new_tokens, settings.gen_max_new_tokens) == ("argmax", 256, 8192)
    assert (settings.prompts, settings.allow_prompt_drift) == ("auto", False)
    assert settings.prompt_source.endswith("VisionXLab/FIRM-Reward/ba4149389e8902b91817fbccce90a4e3cf9f7605")
    assert (settings.cme_w1, settings.cme_w2, settings.qma_w1, settings.qma_w2) == (0.6, 0.4, 0.4, 0.6)


def test_environment_variables_set_values_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRM_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("FIRM_PORT", "9100")
    monkeypatch.setenv("FIRM_GEN_MODEL", "none")
    settings = load_settings(["--port", "9200", "--score-mode", "expected"])
    assert settings.max_batch_size == 32
    assert settings.port == 9200
    assert settings.gen_model == "none"
    assert settings.score_mode == "expected"


def test_boolean_flags(tmp_path: Path) -> None:
    assert load_settings(["--tiny", "--cache-dir", str(tmp_path)]).tiny is True
    assert load_settings(["--no-tiny"]).tiny is False


@pytest.mark.parametrize(
    "values",
    [
        {"cme_w1": 0.0, "cme_w2": 0.0},
        {"qma_w1": -0.1},
        {"edit_model": "none", "gen_model": "none"},
        {"max_batch_size": 0},
        {"unknown_setting": 1},
    ],
)
def test_invalid_settings_are_refused(values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def _firm_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_help_explains_every_flag_and_its_environment_variable() -> None:
    result = _firm_serve("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for flag, env in (("--edit-model", "FIRM_EDIT_MODEL"), ("--max-wait-ms", "FIRM_MAX_WAIT_MS")):
        assert flag in text and env in text
    assert "CME" in text and "QMA" in text


def test_bad_values_exit_with_a_message_naming_the_flag() -> None:
    result = _firm_serve("--cme-w1", "0", "--cme-w2", "0")
    assert result.returncode != 0
    assert "w1 + w2 must be positive" in result.stderr
    result = _firm_serve("--max-batch-size", "0")
    assert result.returncode != 0 and "--max-batch-size" in result.stderr


def test_a_budget_the_vllm_context_cannot_hold_stops_startup(tmp_path: Path) -> None:
    result = _firm_serve(
        "--engine", "vllm", "--edit-model", str(tmp_path), "--gen-model", "none", "--edit-max-new-tokens", "16384",
        "--max-model-len", "16384",
    )  # fmt: skip
    assert result.returncode != 0
    assert "--max-model-len 16384 cannot hold the largest images and answer of a call of the edit" in result.stderr
    assert "--edit-max-new-tokens 16384" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_template_without_its_placeholder_stops_startup(tmp_path: Path) -> None:
    template = tmp_path / "execution.txt"
    template.write_text("Rate the edit from 1 to 5.")
    result = _firm_serve("--prompts", "own", "--edit-execution-template", str(template), "--port", "0")
    assert result.returncode != 0
    assert "missing ['{prompt}']" in result.stderr and "Traceback" not in result.stderr


def test_a_public_address_with_an_empty_key_file_still_needs_keys(tmp_path: Path) -> None:
    """A key file holding only comments leaves authentication off, so it must not pass for keys."""
    from pydantic import ValidationError

    from server.settings import Settings

    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys yet\n")
    with pytest.raises(ValidationError, match="without API keys"):
        Settings(host="0.0.0.0", api_key_file=empty)
    with pytest.raises(ValidationError, match="cannot read the API key file"):
        Settings(api_key_file=tmp_path / "missing.txt")


def test_a_torchvision_built_for_another_torch_stops_start_and_check_with_what_to_install(tmp_path: Path) -> None:
    """As a CPU torch beside a CUDA torchvision fails on import; said before any critic loads."""
    import os

    mismatched = tmp_path / "torchvision"
    mismatched.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # another build (CPU beside CUDA) and another release (an API torch does not have yet)
    for error in ("RuntimeError('operator torchvision::nms does not exist')", "AttributeError('no register_fake')"):
        (mismatched / "__init__.py").write_text(f"raise {error}\n")
        for command in ([], ["check"]):
            result = _firm_serve(*command, "--tiny", "--port", "0", env=env)
            assert result.returncode == 2, result.stderr[-2000:]
            assert "does not work with torch" in result.stderr and error.split("(")[0] in result.stderr
            assert "--index-url https://download.pytorch.org/whl/cpu" in result.stderr
            assert "Traceback" not in result.stderr
    # a remote server's engine and a plug-in run no critic here: not refused for it
    for engine in ("openai", "bench.sim_engine:SimulatedEngine"):
        others = ("--openai-base-urls", "http://127.0.0.1:1", "--prompts", "own", "--cache-dir", str(tmp_path))
        remote = _firm_serve("check", "--engine", engine, *others, env=env)
        assert "does not work with torch" not in remote.stderr, remote.stderr[-2000:]
        engine_line = next(line for line in remote.stdout.splitlines() if line.split()[1:2] == ["engine"])
        assert engine_line.startswith("ok") and engine in engine_line, remote.stdout
