from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from server.engines import Engine, GenerationRequest, GenerationResult, create_engine, resolve_engine_name


class CountingEngine(Engine):
    """A plug-in engine as a user would write one."""

    name = "counting"
    batches_itself = True

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [GenerationResult(text="\\boxed{3}") for _ in requests]


def test_auto_picks_transformers_here_and_says_why() -> None:
    name, reason = resolve_engine_name("auto")
    assert name == "transformers"
    assert reason.startswith("auto: ") and ("vllm is not installed" in reason or "no CUDA" in reason)
    assert resolve_engine_name("openai") == ("openai", "chosen in the settings")


def test_a_plugin_engine_is_loaded_by_module_and_class_name() -> None:
    engine = create_engine(f"{__name__}:CountingEngine", "some-model", ("1", "2"), revision="abc", device="cpu")
    assert isinstance(engine, CountingEngine)
    assert (engine.model, engine.revision, engine.options["device"]) == ("some-model", "abc", "cpu")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nonsense", "use a built-in name"),
        ("no_such_module:Engine", "cannot be loaded"),
        (f"{__name__}:Missing", "cannot be loaded"),
        ("pathlib:Path", "not a subclass"),
    ],
)
def test_bad_plugin_names_are_refused_clearly(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        create_engine(spec, "m", ("1",))


def test_the_openai_engine_needs_a_base_url() -> None:
    with pytest.raises(ValueError, match="at least one base URL"):
        create_engine("openai", "m", ("1",))


def test_nothing_imports_vllm_at_module_import() -> None:
    code = (
        "import sys, server.app, server.cli, server.engines.vllm, server.engines.openai, "
        "server.engines.transformers, clients.protocol; assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_a_plugin_engine_serves_over_http(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--engine package.module:ClassName` through a real firm-serve: the benchmark's simulated engine."""
    import httpx

    from tests.support import b64, running_server

    monkeypatch.setenv("FIRM_SIM_A", "0.01")
    monkeypatch.setenv("FIRM_SIM_B", "0.0")
    args = ("--engine", "bench.sim_engine:SimulatedEngine", "--edit-model", "sim", "--gen-model", "none")
    with running_server(tmp_path, *args, tiny=False) as url:
        models = httpx.get(f"{url}/v1/models").json()["models"]
        body = {"source": b64("blue"), "instruction": "Make it red.", "candidates": [b64("red"), b64("green")]}
        reply = httpx.post(f"{url}/v1/edit/score_group", json=body, timeout=30).json()
    assert [(m["engine"], m["engine_reason"]) for m in models] == [("simulated", "chosen in the settings")]
    assert [r["execution"]["score"] for r in reply["results"]] == [4, 4]
    assert reply["results"][0]["execution"]["expected"] == pytest.approx(3.9)
    assert reply["group"]["scored"] == 2
