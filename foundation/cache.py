"""Where built and downloaded artefacts are kept, and how a folder there is built exactly once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """The folder the commands keep their artefacts in unless told otherwise."""
    return Path.home() / ".cache" / "firm-reward-server"


def build_once(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(path)` unless it already holds `marker`. The build happens in a staging
    folder renamed into place, so a crash leaves no half copy and two processes racing keep one copy."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build(staging / "model")
        try:
            os.replace(staging / "model", target)
        except OSError:
            if not (target / marker).exists():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
