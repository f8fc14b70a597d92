"""The released critics' prompts: obtained at run time from the public release, verified, cached.

FIRM-Edit-8B and FIRM-Gen-8B were fine-tuned on particular prompt texts, which live in two
Python files of the public release. This project holds no copy of them. Like weights, they are
read from a source (the release's raw files at a pinned commit by default, a mirror URL, or a
local checkout), checked against the SHA-256 digests pinned here, and kept in the cache
directory so that later starts, and air-gapped boxes filled by `firm-serve prompts pull`, need
no network. The files are parsed, never executed (`server.prompts.pysource`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.prompts.pysource import SourceError, constant

log = logging.getLogger(__name__)

RELEASE_REPO = "VisionXLab/FIRM-Reward"
RELEASE_COMMIT = "ba4149389e8902b91817fbccce90a4e3cf9f7605"
DEFAULT_SOURCE = f"https://raw.githubusercontent.com/{RELEASE_REPO}/{RELEASE_COMMIT}"
RELEASED_CHECKPOINTS = ("VisionXLab/FIRM-Edit-8B", "VisionXLab/FIRM-Gen-8B")
# What to do when the source can't be had, as each command says it: a server starting can be helped by a pull,
# a pull itself cannot.
START_HINT = (
    "run `firm-serve prompts pull` where the source can be reached (it fills the cache), point "
    "--prompt-source at a local copy of the release, or try the service without the release with --tiny"
)
PULL_HINT = (
    "point --prompt-source at a local checkout or copy of the release; or run `firm-serve prompts pull --to "
    "<folder>` on a machine with network, carry the folder here and pass it as --prompt-source; or try the "
    "service without the release with --tiny"
)


class PromptSourceError(ValueError):
    """The released prompts could not be obtained or do not match their pinned digests."""


@dataclass(frozen=True)
class ReleasedFile:
    path: str  # relative to the root of the release
    sha256: str  # of the file at RELEASE_COMMIT


EDIT_FILE = ReleasedFile(
    "editing/reward_server/prompt_template.py", "cf383a14f08c335611f03996a7b89da42a8897ed9b59bcd89fc0c9c68e2f567b"
)
GEN_FILE = ReleasedFile(
    "generation/flow_grpo/prompt_template.py", "7b0ce4a4f121bebacd9047d95414d25241b3d43fad31bbdc2afffff80c66837c"
)
# judge -> (the file, the name of its template there)
RELEASED_TEMPLATES: dict[str, tuple[ReleasedFile, str]] = {
    "edit_execution": (EDIT_FILE, "SCORE_EXECUTION"),
    "edit_consistency": (EDIT_FILE, "SCORE_CONSISTENCY"),
    "gen_instruction_following": (GEN_FILE, "SCORE"),
    "gen_quality": (GEN_FILE, "Quality_PROMPT"),
}
PINNED: dict[str, str] = {f.path: f.sha256 for f in (EDIT_FILE, GEN_FILE)}


def is_released_checkpoint(model: str) -> bool:
    """Whether `model` names one of the released critics: its hub id, a local copy in a folder named after
    it, or a snapshot in the Hugging Face cache (any case).

    >>> is_released_checkpoint("VisionXLab/FIRM-Edit-8B"), is_released_checkpoint("/ckpt/my-critic")
    (True, False)
    >>> is_released_checkpoint("/hf/hub/models--VisionXLab--FIRM-Gen-8B/snapshots/0a1b")
    True
    >>> is_released_checkpoint("/weights/FIRM-Edit-8B")
    True
    """
    name = model.strip().rstrip("/").lower()
    for released in RELEASED_CHECKPOINTS:
        repo = released.lower()
        if name == repo or name.endswith("/" + repo.split("/")[1]) or f"models--{repo.replace('/', '--')}/" in name:
            return True
    return False


@dataclass(frozen=True)
class FetchedFile:
    path: str  # in the release's layout
    location: str  # where it was read from (URL or file) or, from the cache, the cached copy
    sha256: str
    verified: bool  # equal to the pinned digest
    text: str


@dataclass(frozen=True)
class ReleasedPrompt:
    """One judge's template as the release wrote it, with where it came from."""

    judge: str
    text: str
    origin: str  # location#CONSTANT
    sha256: str  # of the file it was read from
    verified: bool


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".prompt-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


class PromptSource:
    """Where the released prompt files are read from, and the cache that keeps them."""

    def __init__(
        self,
        source: str,
        cache_dir: Path,
        *,
        allow_drift: bool = False,
        pins: Mapping[str, str] = PINNED,
        timeout_s: float = 30.0,
    ) -> None:
        self.source, self.allow_drift, self.pins, self.timeout_s = source.rstrip("/"), allow_drift, pins, timeout_s
        key = hashlib.sha256(self.source.encode()).hexdigest()[:16]
        self.cache = Path(cache_dir) / "prompts" / key  # one folder per source: a mirror never shadows another

    def _download(self, path: str, hint: str) -> tuple[bytes, str]:
        if not _is_url(self.source):
            local = Path(self.source) / path
            try:
                return local.read_bytes(), str(local)
            except OSError as exc:
                raise PromptSourceError(f"cannot read {local}: {exc.strerror or exc}; {hint}") from exc
        url = f"{self.source}/{path}"
        try:
            response = httpx.get(url, timeout=self.timeout_s, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise PromptSourceError(f"cannot fetch {url}: it answered {exc.response.status_code}; {hint}") from exc
        except httpx.HTTPError as exc:
            cause = str(exc) or type(exc).__name__
            raise PromptSourceError(f"could not reach {url} ({cause}); {hint}") from exc
        return response.content, url

    def file(self, path: str, *, refresh: bool = False, hint: str = START_HINT) -> FetchedFile:
        """The file at `path`, from the cache when the source is a URL and it is there, checked
        against its pinned digest: a file that differs is refused unless drift is allowed. `hint` is what
        to do instead when the source can't be had, in the words of the command that asked."""
        cached = self.cache / path
        if _is_url(self.source) and cached.exists() and not refresh:
            data, location = cached.read_bytes(), str(cached)
            fresh = False
        else:
            data, location = self._download(path, hint)
            fresh = _is_url(self.source)
        digest = hashlib.sha256(data).hexdigest()
        pinned = self.pins.get(path)
        verified = digest == pinned
        if not verified:
            what = f"{path} from {location} has SHA-256 {digest}, but the released file has {pinned}"
            if not self.allow_drift:
                remedy = (
                    "run `firm-serve prompts pull` to fetch it again"
                    if location == str(cached)
                    else "pass --allow-prompt-drift to serve them anyway"
                )
                raise PromptSourceError(
                    f"refusing {what}: the critic would get prompts it was not trained on ({remedy})"
                )
            log.warning("prompt drift allowed: %s", what)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptSourceError(f"{location} is not UTF-8 text") from exc
        if fresh:  # only a readable file that passed its check (or was allowed to drift) is kept
            _write_atomically(cached, data)
            (self.cache / "SOURCE").write_text(self.source + "\n")
        return FetchedFile(path=path, location=location, sha256=digest, verified=verified, text=text)

    def prompts(self, judges: Iterable[str]) -> dict[str, ReleasedPrompt]:
        """The released template of each judge, read from its file (each file fetched once)."""
        files: dict[str, FetchedFile] = {}
        found: dict[str, ReleasedPrompt] = {}
        for judge in judges:
            released, name = RELEASED_TEMPLATES[judge]
            if released.path not in files:
                files[released.path] = self.file(released.path)
            fetched = files[released.path]
            try:
                text = constant(fetched.text, name, fetched.location)
            except SourceError as exc:
                raise PromptSourceError(str(exc)) from exc
            found[judge] = ReleasedPrompt(
                judge=judge,
                text=text,
                origin=f"{fetched.location}#{name}",
                sha256=fetched.sha256,
                verified=fetched.verified,
            )
        return found

    def pull(self) -> list[FetchedFile]:
        """Fetch every released file again and keep it in the cache (for offline starts)."""
        paths = sorted({f.path for f, _ in RELEASED_TEMPLATES.values()})
        return [self.file(path, refresh=True, hint=PULL_HINT) for path in paths]
