"""Every served critic onto this machine, in the order that fails soonest: each checkpoint's file list and
config first (seconds), then the memory check over all of them, then the weights, with progress."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.checkpoints.hub import HubAccess, Listing, cached_snapshot, fetch, is_local, list_files, repo_cache
from server.checkpoints.memory import (
    SLOW_ON_CPU_PARAMETERS,
    Available,
    MemoryRefusal,
    Need,
    Verdict,
    count,
    estimate,
    judge,
    read_memory,
)
from server.checkpoints.progress import DownloadProgress, size
from server.engines.base import Engine

log = logging.getLogger(__name__)
# Read before the weights: what the memory check and an engine's processor need, a few KB each.
SMALL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """One engine's critic, prepared: where its files come from and what it needs."""

    label: str  # the tasks it serves, e.g. "edit" or "edit+gen"
    model: str
    listing: Listing | None  # None for a local folder
    need: Need | None  # None when the engine holds no weights here or the config could not be read


@dataclass
class Provisioner:
    """How critics are fetched and checked: hub access, `--force`, and each task's call sizes in tokens
    (the largest call it accepts, and a typical one) for the memory estimate."""

    access: HubAccess
    force: bool = False
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    _warned_cpu: bool = field(default=False, init=False)  # the slow-CPU warning is said once

    def prepare(self, tasks: Sequence[str], engine: Engine) -> Checkpoint:
        """List the files and read the config (blocking: run off the event loop)."""
        label, model = "+".join(tasks), engine.model
        listing: Listing | None = None
        if is_local(model):
            folder = Path(model).expanduser()
        else:
            listing = list_files(model, engine.revision, self.access)
            small = [name for name in SMALL_FILES if name in listing.files]
            folder = fetch(listing, self.access, small)
        calls = self._calls(tasks)
        return Checkpoint(
            label=label, model=model, listing=listing, need=self._need(label, model, folder, engine, calls)
        )

    @staticmethod
    def _need(label: str, model: str, folder: Path, engine: Engine, calls: tuple[int, int]) -> Need | None:
        """The critic's estimate, or None (said in the log) when its config cannot be read as a model: the
        engine's own load then says what is wrong with it."""
        plan = engine.memory_plan()
        if plan is None or not (folder / "config.json").is_file():
            return None
        try:
            return estimate(label, model, folder, plan, calls)
        except (ValueError, KeyError, OSError) as exc:  # what transformers raises for a config it cannot read
            # a config transformers cannot build a model from: no estimate, and the engine's load decides
            first = (str(exc).splitlines() or [""])[0]
            log.warning("memory: no estimate for %s (%s: %s)", model, type(exc).__name__, first)
            return None

    def _calls(self, tasks: Sequence[str]) -> tuple[int, int]:
        """(largest, typical) call in tokens of an engine serving `tasks`: the most of each."""
        sizes = [self.tokens.get(t, (0, 0)) for t in tasks]
        return max(s[0] for s in sizes), max(s[1] for s in sizes)

    def verdict(
        self, checkpoints: Sequence[Checkpoint], offered: Mapping[str, Available | str] | None = None
    ) -> Verdict | None:
        """What the memory check finds for these critics on their devices (`offered`: the devices already
        read, a device that could not be read as why); None when none can be estimated. The critics on a
        device whose memory cannot be read are left out, and the device named in `unread`."""
        needs = [c.need for c in checkpoints if c.need is not None]
        if not needs:
            return None
        known = offered or {}
        devices = {d: known[d] if d in known else read_memory(d) for d in dict.fromkeys(n.plan.device for n in needs)}
        read = {d: has for d, has in devices.items() if isinstance(has, Available)}
        verdict = judge([n for n in needs if n.plan.device in read], offered=read)
        return dataclasses.replace(verdict, unread={d: has for d, has in devices.items() if isinstance(has, str)})

    def check(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Refuse (MemoryRefusal) the critics that cannot fit their devices, unless forced."""
        verdict = self.verdict(checkpoints)
        if verdict is None:
            return
        needs = [c.need for c in checkpoints if c.need is not None]
        for device, why in verdict.unread.items():
            log.warning("no memory check for the critics on %s: its memory could not be read (%s)", device, why)
        for line in verdict.lines:
            log.info("memory: %s", line)
        if verdict.refuse is not None:
            if not self.force:
                raise MemoryRefusal(verdict.refuse, verdict.refused)
            log.warning("--force: loading although %s", verdict.refuse)
        slow = [n for n in needs if n.plan.device == "cpu" and n.parameters > SLOW_ON_CPU_PARAMETERS]
        if slow and not self._warned_cpu:
            self._warned_cpu = True
            log.warning(
                "the %s critic has %s parameters and runs on the CPU: scoring will take minutes per item; "
                "use a GPU for training, or --tiny to try the service",
                slow[0].label,
                count(slow[0].parameters),
            )

    @staticmethod
    def missing(listing: Listing) -> dict[str, int]:
        """The files of `listing` not yet in the cache, with their sizes."""
        snapshot = cached_snapshot(listing.model, listing.commit)
        return {n: s for n, s in listing.files.items() if snapshot is None or not (snapshot / n).is_file()}

    def download(self, checkpoint: Checkpoint) -> Path | None:
        """The weights and the rest of the files, with progress in the log (blocking); the folder they are
        in, None for a local checkpoint."""
        listing = checkpoint.listing
        if listing is None:
            return None
        missing = self.missing(listing)
        if not missing:
            log.info("%s: all %d files already in the cache", listing.model, len(listing.files))
            return cached_snapshot(listing.model, listing.commit)
        with DownloadProgress(listing.model, repo_cache(listing.model), sum(missing.values())):
            folder = fetch(listing, self.access)
        log.info("downloaded %s: %s in %d files", listing.model, size(sum(missing.values())), len(missing))
        return folder
