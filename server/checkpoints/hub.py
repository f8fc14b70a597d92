"""A critic's files from the Hugging Face hub, with a bounded number of tries and a plain reason when
they cannot be had.

Left to itself, an engine given a hub id fetches through libraries that retry for minutes, report no
progress and leave the server nothing to say but a stack trace. The server lists and fetches the files
first instead: a failure is classified (no route, not found, gated, the hub failing, a full disk, not
cached while offline) and named with what to do about it, within seconds.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_ENDPOINT = "https://huggingface.co"
# Formats an engine never reads when the repository has safetensors, and files no engine reads at all.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot")
_NEVER = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".gitattributes")


class Cause(enum.StrEnum):
    """Why a checkpoint cannot be had; the value is how the log and `/readyz` say it."""

    NO_ROUTE = "no route to the hub"
    TIMEOUT = "the hub did not answer in time"
    NOT_FOUND = "not found on the hub (or private, and no token was given)"
    GATED = "gated: it needs a token of an account that accepted its terms"
    HUB_ERROR = "the hub answered with an error"
    DISK_FULL = "no room left on the disk of the Hugging Face cache"
    NOT_CACHED = "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    OTHER = "it could not be fetched"

    @property
    def transient(self) -> bool:
        """Worth another try: the same call may succeed in a few seconds."""
        return self in (Cause.NO_ROUTE, Cause.TIMEOUT, Cause.HUB_ERROR)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: only the local cache may be read."""
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in _OFFLINE_VARS)


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def remedies(cause: Cause, model_flag: str) -> list[str]:
    """What a user can do about `cause`, most specific first; `--tiny` always closes the list."""
    local = f"give a local folder holding the checkpoint as {model_flag}"
    cache = "fill the Hugging Face cache where the hub can be reached, carry it here (HF_HOME), set HF_HUB_OFFLINE=1"
    specific = {
        Cause.NO_ROUTE: [f"check this machine's route or proxy to {endpoint()}", cache, local],
        Cause.TIMEOUT: [
            f"check this machine's route or proxy to {endpoint()} (or raise --hub-timeout-s)",
            cache,
            local,
        ],
        Cause.NOT_FOUND: ["check the model id and revision", "set HF_TOKEN if the model is private or gated", local],
        Cause.GATED: ["accept the model's terms on the hub and set HF_TOKEN to a token of that account", local],
        Cause.HUB_ERROR: ["try again later (or raise --hub-retries)", cache, local],
        Cause.DISK_FULL: ["free space on that disk, or point HF_HOME at a larger one", local],
        Cause.NOT_CACHED: ["unset HF_HUB_OFFLINE to download it", cache, local],
        Cause.OTHER: [cache, local],
    }[cause]
    return [*specific, "try the service without it with --tiny"]


class CheckpointUnavailable(RuntimeError):
    """A checkpoint cannot be had, for `cause`; `str()` is the one line the log and `/readyz` give."""

    def __init__(self, model: str, cause: Cause, detail: str) -> None:
        self.model, self.cause, self.detail = model, cause, detail
        super().__init__(self.describe())

    def describe(self, model_flag: str = "the model setting") -> str:
        todo = "; ".join(remedies(self.cause, model_flag))
        return f"{self.model} cannot be had: {self.cause} ({self.detail}). What to do: {todo}"


@dataclass(frozen=True)
class HubAccess:
    """How the hub is asked: tries after the first, a time limit per call, and offline mode."""

    retries: int = 2
    timeout_s: float = 10.0
    offline: bool = False

    @classmethod
    def from_environment(cls, retries: int, timeout_s: float) -> HubAccess:
        return cls(retries=retries, timeout_s=timeout_s, offline=offline())

    def attempt(self, model: str, what: str, call: Callable[[], T]) -> T:
        """`call()`, tried again after a transient failure, at most `retries` more times (1, 2, 4 s apart)."""
        tries = 1 + self.retries
        for number in range(1, tries + 1):
            try:
                return call()
            except CheckpointUnavailable:
                raise
            except Exception as exc:  # classified, then raised as CheckpointUnavailable or tried again
                cause, detail = classify(exc)
                if not cause.transient or number == tries:
                    raise CheckpointUnavailable(model, cause, detail) from exc
                wait = min(2.0 ** (number - 1), 8.0)
                log.warning(
                    "%s %s: %s (%s); try %d of %d in %.0f s", what, model, cause, detail, number + 1, tries, wait
                )
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def classify(exc: BaseException) -> tuple[Cause, str]:
    """The cause of a failed hub call, read from the exception and the ones it was raised from."""
    chain = list(_chain(exc))
    for error in chain:
        names = {cls.__name__ for cls in type(error).__mro__}
        if "GatedRepoError" in names:
            return Cause.GATED, _first_line(error)
        if names & {"RepositoryNotFoundError", "RevisionNotFoundError", "HFValidationError"}:
            return Cause.NOT_FOUND, _first_line(error)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return Cause.DISK_FULL, error.strerror or str(error)
        if "OfflineModeIsEnabled" in names:
            return Cause.NOT_CACHED, _first_line(error)
    for error in chain:
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"ConnectTimeout", "ReadTimeout", "TimeoutException", "Timeout"} or isinstance(error, TimeoutError):
            return Cause.TIMEOUT, _first_line(error)
        if names & {"ConnectError", "NetworkError", "RemoteProtocolError"} or isinstance(error, ConnectionError):
            return Cause.NO_ROUTE, _first_line(error)
        status = getattr(getattr(error, "response", None), "status_code", None)
        if "HfHubHTTPError" in names and isinstance(status, int):
            if status in (401, 404):
                return Cause.NOT_FOUND, f"HTTP {status}"
            if status == 403:
                return Cause.GATED, f"HTTP {status}"
            return Cause.HUB_ERROR, f"HTTP {status}"
    if any("LocalEntryNotFoundError" in {c.__name__ for c in type(e).__mro__} for e in chain):
        return (Cause.NOT_CACHED, "no snapshot in the cache") if offline() else (Cause.NO_ROUTE, _first_line(exc))
    return Cause.OTHER, f"{type(exc).__name__}: {_first_line(exc)}"


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def needed(names: Iterable[str]) -> list[str]:
    """The files of a repository an engine reads: safetensors over other weight formats, no media."""
    names = list(names)
    safetensors = any(n.endswith(".safetensors") for n in names)
    return [
        n
        for n in names
        if not n.endswith(_NEVER) and not n.startswith("original/") and not (safetensors and n.endswith(_OTHER_WEIGHTS))
    ]


@dataclass(frozen=True)
class Listing:
    """The files of one checkpoint revision that an engine will read, with their sizes in bytes."""

    model: str
    commit: str | None
    files: dict[str, int]
    revision: str | None = None  # as asked for (a branch, a tag, a commit; None: the default branch)


def list_files(model: str, revision: str | None, access: HubAccess) -> Listing:
    """The checkpoint's files at `revision`: from the hub, or from the cache alone when offline."""
    from huggingface_hub import HfApi, snapshot_download

    if access.offline:
        try:
            path = Path(snapshot_download(model, revision=revision, local_files_only=True))
        except Exception as exc:  # whatever the library raises for a snapshot it does not have
            raise CheckpointUnavailable(model, Cause.NOT_CACHED, _first_line(exc)) from exc
        files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
        return Listing(model=model, commit=path.name, files={n: files[n] for n in needed(files)}, revision=revision)
    info: Any = access.attempt(
        model,
        "listing",
        lambda: HfApi(endpoint=endpoint()).model_info(
            model, revision=revision, files_metadata=True, timeout=access.timeout_s
        ),
    )
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or ()}
    return Listing(model=model, commit=info.sha, files={n: sizes[n] for n in needed(sizes)}, revision=revision)


def fetch(listing: Listing, access: HubAccess, names: Iterable[str] | None = None) -> Path:
    """Download `names` (all the listing's files by default) into the cache; a retry resumes. The revision is
    asked for as given, so the cache records which commit a branch named (an offline start reads that)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the server reports downloads in its own log lines (`progress`), not on stderr
    wanted = list(names) if names is not None else list(listing.files)
    return Path(
        access.attempt(
            listing.model,
            "downloading",
            lambda: snapshot_download(
                listing.model,
                revision=listing.revision,
                allow_patterns=wanted,
                etag_timeout=access.timeout_s,
                local_files_only=access.offline,
                endpoint=endpoint(),
            ),
        )
    )


def repo_cache(model: str) -> Path:
    """The folder of the Hugging Face cache that holds `model`'s files."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}"


def cached_snapshot(model: str, revision: str | None) -> Path | None:
    """The cached snapshot of `model` at `revision`, if its config is there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None
