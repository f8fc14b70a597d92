from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.tiny import ensure_tiny_checkpoint
from tests.support import running_server

collect_ignore = ["fixtures"]  # prompt files in the release's layout: data, not test modules


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny critic is built, once per test session (FIRM_TEST_CACHE keeps it across runs)."""
    kept = os.environ.get("FIRM_TEST_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("firm-cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir: Path) -> Path:
    return ensure_tiny_checkpoint(cache_dir)


@pytest.fixture(scope="session")
def server_url(tiny_checkpoint: Path, cache_dir: Path) -> Iterator[str]:
    """A real `firm-serve --tiny` process serving both critics."""
    with running_server(cache_dir, "--max-wait-ms", "50", "--max-items-per-request", "32") as url:
        yield url
