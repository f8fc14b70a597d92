"""`firm-serve check`: what `firm-serve` would do with the same settings, said before it does it.

It loads no weights: it picks the engine, reads the prompt set, lists each critic's files (fetching only
its config, a few KB), estimates memory against the device, and reads the keys and bind address. Every
finding is one line; the exit status is 1 when `firm-serve` would fail to serve a critic, 2 when the
settings themselves are invalid.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from foundation.flags import flag
from server.assembly import Source, engine_for, engine_groups, model_sources, provisioner
from server.checkpoints.hub import CheckpointUnavailable, cached_snapshot, is_local
from server.checkpoints.memory import Available, gb, read_memory
from server.checkpoints.progress import size
from server.checkpoints.provision import Checkpoint, Provisioner
from server.engines import resolve_engine_name
from server.judges import TemplateError
from server.prompts.release import PromptSourceError
from server.prompts.serving import released_prompts, task_judges
from server.security import is_loopback
from server.settings import Settings


@dataclass(frozen=True)
class Finding:
    topic: str
    text: str
    ok: bool = True


def findings(settings: Settings) -> list[Finding]:
    """Everything `firm-serve` would decide before serving, in the order it decides it."""
    engine_name, reason = resolve_engine_name(settings.engine)
    found = [Finding("engine", f"{engine_name} ({reason})")]
    sources = model_sources(settings)
    found += _prompts(settings, sources)
    found += _models(settings, engine_name, sources)
    found += _access(settings)
    return found


def _prompts(settings: Settings, sources: dict[str, Source]) -> list[Finding]:
    released = released_prompts(settings)
    found = []
    for task, (model, _) in sources.items():
        try:
            judges = task_judges(settings, task, model, released)
        except (PromptSourceError, TemplateError, OSError) as exc:
            return [Finding("prompts", f"cannot be had: {exc}", ok=False)]
        for judge in judges:
            checked = {
                True: "verified against its pinned digest",
                False: "differs from its pinned digest (allowed)",
            }.get(judge.verified, "not the release's")
            found.append(Finding("prompts", f"{task} {judge.name}: {judge.origin} ({checked})"))
    return found


def _models(settings: Settings, engine_name: str, sources: dict[str, Source]) -> list[Finding]:
    provisioning = provisioner(settings)
    found: list[Finding] = []
    checkpoints: list[Checkpoint] = []
    devices: dict[str, Available | str] = {}  # each device read once: its memory, or why it could not be read
    for source, tasks in engine_groups(sources).items():
        label = "+".join(tasks)
        try:
            engine = engine_for(settings, engine_name, source, tasks, CollectorRegistry())
        except (ValueError, ImportError) as exc:
            found.append(Finding(f"{label} model", f"{source[0]}: the {engine_name} engine refuses it: {exc}", False))
            continue
        if not engine.loads_checkpoint:
            found.append(Finding(f"{label} model", f"{source[0]}, served by the {engine.name} engine elsewhere"))
            continue
        try:
            where = _where(source[0], source[1])
            checkpoint = provisioning.prepare(tasks, engine)
        except CheckpointUnavailable as exc:
            found.append(Finding(f"{label} model", exc.describe(flag(f"{tasks[0]}_model")), ok=False))
            continue
        except (ValueError, OSError) as exc:  # an id the hub library refuses, an unreadable cache: a finding
            found.append(Finding(f"{label} model", f"{source[0]}: {type(exc).__name__}: {exc}", ok=False))
            continue
        checkpoints.append(checkpoint)
        found.append(Finding(f"{label} model", f"{source[0]}: {where}{_to_fetch(provisioning, checkpoint)}"))
        if (plan := engine.memory_plan()) is not None:
            if plan.device not in devices:
                devices[plan.device] = read_memory(plan.device)
            has = devices[plan.device]
            if isinstance(has, str):
                found.append(Finding(f"{label} device", f"{plan.device}: {has}", ok=False))
            else:
                found.append(Finding(f"{label} device", f"{plan.device}, {gb(has.free)} free of {gb(has.total)}"))
    found += _memory(settings, provisioning, checkpoints, devices)
    return found


def _where(model: str, revision: str | None) -> str:
    if is_local(model):
        return "a local folder"
    snapshot = cached_snapshot(model, revision)
    return f"cached at {snapshot}" if snapshot is not None else "not cached"


def _to_fetch(provisioning: Provisioner, checkpoint: Checkpoint) -> str:
    if checkpoint.listing is None:
        return ""
    missing = provisioning.missing(checkpoint.listing)
    if not missing:
        return f" ({len(checkpoint.listing.files)} files, all in the cache)"
    return f" ({size(sum(missing.values()))} in {len(missing)} files to download from the hub)"


def _memory(
    settings: Settings, provisioning: Provisioner, checkpoints: list[Checkpoint], devices: dict[str, Available | str]
) -> list[Finding]:
    """The estimate for the critics on each device whose memory was read; a line for each that was not."""
    verdict = provisioning.verdict(checkpoints, offered=devices)
    if verdict is None:
        return [Finding("memory", "no estimate (no critic whose weights are held here could be read)")]
    found = [Finding("memory", f"no estimate for {d} (its memory could not be read)") for d in sorted(verdict.unread)]
    found += [Finding("memory", line) for line in verdict.lines]
    if verdict.refuse is not None:
        if settings.force:
            found.append(Finding("memory", f"{verdict.refuse} (--force: it would load anyway)"))
        else:
            found.append(Finding("memory", f"would refuse to load: {verdict.refuse}", ok=False))
    return found


def _access(settings: Settings) -> list[Finding]:
    ring = settings.key_ring()
    keys = f"{len(ring.scoring)} API key(s) required on scoring routes" if ring.enabled else "no API keys"
    admin = "admin routes on (admin key set)" if ring.admin else "admin routes off (no admin key)"
    exposure = "loopback only" if is_loopback(settings.host) else "reachable from other machines"
    return [
        Finding("keys", f"{keys}; {admin}; /metrics {'needs a key' if ring.protect_metrics else 'open'}"),
        Finding("bind", f"http://{settings.host}:{settings.port} ({exposure})"),
    ]


def report(found: Sequence[Finding]) -> str:
    width = max(len(f.topic) for f in found)
    return "\n".join(f"{'ok  ' if f.ok else 'FAIL'}  {f.topic:<{width}}  {f.text}" for f in found)


def main(settings: Settings) -> int:
    found = findings(settings)
    print(report(found))
    failed = [f for f in found if not f.ok]
    if failed:
        print(f"\nfirm-serve would not serve everything: {len(failed)} problem(s) above.", file=sys.stderr)
        return 1
    print("\nfirm-serve would start with these settings.")
    return 0
