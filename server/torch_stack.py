"""Whether the installed torch and torchvision work together, said before anything loads.

pip installs torch and torchvision independently: a CPU torch beside a CUDA torchvision (or two
releases apart) passes the install, then fails deep inside transformers when a critic's processor is
built, with an error that names a processor class rather than the mismatch.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

CPU_INSTALL = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def torchvision_problem() -> str | None:
    """What is wrong with the installed torchvision for the installed torch; None when it imports, or
    when it is not installed (transformers then says what it lacks itself)."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401  (its operators register against torch on import)
    except Exception as exc:  # noqa: BLE001 - said, with what to install: RuntimeError for another build, AttributeError or ImportError for another release
        return (
            f"torchvision {_installed('torchvision')} does not work with torch {_installed('torch')} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): install the two together "
            f"from one index, the same build of each (CPU or CUDA); on a machine without a GPU: {CPU_INSTALL}"
        )
    return None
