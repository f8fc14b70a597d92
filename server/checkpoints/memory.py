"""Will the critics fit? An estimate from each checkpoint's config, against what its device has.

A full-size critic loaded where it does not fit is killed by the kernel without a word (CPU), or dies of
an out-of-memory error deep inside a library (GPU), after its whole download. The estimate is made
before: the parameters of the model the config describes (built on PyTorch's meta device, so nothing
is allocated) times the size of the weights' dtype, plus the key-value cache of the calls a batch
holds, plus a margin for the framework itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engines.base import MemoryPlan

GB = 1000**3
RUNTIME_BYTES = 1 * GB  # per engine: the framework's own memory (allocator, CUDA context, Python)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SLOW_ON_CPU_PARAMETERS = 1_000_000_000  # past this, a CPU takes minutes per judge call


class MemoryRefusal(RuntimeError):
    """The critics would not fit in their device's memory; `str()` gives both figures and the options,
    `labels` the critics refused (a critic that fits, or was not estimated, is not among them)."""

    def __init__(self, reason: str, labels: frozenset[str]) -> None:
        super().__init__(reason)
        self.labels = labels


@dataclass(frozen=True)
class Need:
    """What one engine's critic needs, estimated from its config."""

    label: str  # the tasks it serves, e.g. "edit"
    model: str
    parameters: int
    plan: MemoryPlan
    kv_per_token: int  # bytes of key-value cache per token of a call
    largest_call: int = 0  # tokens of the largest call the server accepts for it
    typical_call: int = 0  # tokens of a typical call, what a full batch is estimated with

    @property
    def weights(self) -> int:
        return self.parameters * DTYPE_BYTES[self.plan.dtype]

    @property
    def least(self) -> int:
        """Weights, the largest call and the runtime: under this, not every call can run."""
        return self.weights + self.kv_per_token * self.largest_call + RUNTIME_BYTES

    @property
    def at_batch(self) -> int:
        """With a full batch (`plan.batch` typical calls)."""
        return self.weights + self.kv_per_token * self.typical_call * self.plan.batch + RUNTIME_BYTES


@dataclass(frozen=True)
class Available:
    device: str
    free: int
    total: int


def read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def parameters(config: Any) -> int:
    """How many parameters the model `config` describes has: built on the meta device, nothing allocated."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def kv_per_token(config: Any, dtype: str) -> int:
    """Bytes of key-value cache one token takes in the language model of `config`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0))
    heads = int(getattr(text, "num_attention_heads", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // max(heads, 1))
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def estimate(label: str, model: str, config_folder: Path, plan: MemoryPlan, calls: tuple[int, int]) -> Need:
    """The need of the critic in `config_folder`, held as `plan` says, for calls of (largest, typical) tokens."""
    config = read_config(config_folder)
    kv = kv_per_token(config, plan.dtype)
    return Need(label, model, parameters(config), plan, kv, largest_call=calls[0], typical_call=calls[1])


def available(device: str) -> Available:
    """Free and total memory of `device` ('cpu', 'cuda', 'cuda:1'): the GPU's as CUDA reports it; the
    machine's, or its container's limit when lower."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return Available(device=device, free=free, total=total)
    info = _meminfo()
    free, total = info.get("MemAvailable", 0), info.get("MemTotal", 0)
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        used = _cgroup_usage() or 0
        free, total = min(free, max(0, limit - used)), limit
    return Available(device="cpu", free=free, total=total)


def read_memory(device: str) -> Available | str:
    """`available(device)`, or why it could not be read (a CUDA device not there, or not usable): the
    critics on such a device get no estimate, and those on the others still do."""
    try:
        return available(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux: what POSIX reports
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES")
        return {"MemTotal": pages * size, "MemAvailable": free * size}
    values: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() and int(text) < 1 << 60 else None
    return None


def _cgroup_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 100_000_000 else f"{parameters / 1e6:.2f} M"


@dataclass(frozen=True)
class Verdict:
    """What the check found: the lines to say, and whether loading must be refused."""

    lines: list[str]
    refuse: str | None  # the refusal, when the critics cannot fit
    refused: frozenset[str] = frozenset()  # the labels of the critics that cannot
    unread: dict[str, str] = field(default_factory=dict)  # device -> why its memory could not be read


def judge(needs: Sequence[Need], *, offered: dict[str, Available]) -> Verdict:
    """Each device's critics against its memory, `offered[device]`. A vLLM engine is held to its share."""
    lines: list[str] = []
    refusals: list[str] = []
    refused: set[str] = set()
    for device in dict.fromkeys(n.plan.device for n in needs):
        here = [n for n in needs if n.plan.device == device]
        has = offered[device]
        for need in here:
            lines.append(
                f"{need.label} critic {need.model}: {count(need.parameters)} parameters in {need.plan.dtype} "
                f"= {gb(need.weights)} of weights on {device}"
            )
        shared = [n for n in here if n.plan.share is None]
        least = sum(n.least for n in shared)
        for need in here:
            if need.plan.share is not None:  # vLLM: its own share of the device, the rest its cache
                budget = need.plan.share * has.total
                if need.least > budget:
                    refused.add(need.label)
                    refusals.append(
                        _too_big([need], device, budget, f"its --{need.label}-gpu-memory-utilization share")
                    )
        if shared and least > has.free:
            refused.update(n.label for n in shared)
            refusals.append(_too_big(shared, device, has.free, "available"))
        elif shared:
            lines.append(
                f"{'+'.join(n.label for n in shared)} on {device}: about {gb(least)} needed of {gb(has.free)} available"
            )
            if sum(n.at_batch for n in shared) > has.free:
                lines.append(_batch_warning(shared, has.free - least))
    return Verdict(lines=lines, refuse="; ".join(refusals) or None, refused=frozenset(refused))


def _too_big(needs: Sequence[Need], device: str, room: float, what: str) -> str:
    names = " and ".join(
        f"the {n.label} critic ({n.parameters / 1e9:.1f} B parameters in {n.plan.dtype})" for n in needs
    )
    need = sum(n.least for n in needs)  # the figure the refusal compared
    options = ["a GPU with more memory" if device.startswith("cuda") else "a GPU"]
    if any(n.plan.dtype == "float32" for n in needs):
        half = sum(n.parameters * 2 + RUNTIME_BYTES for n in needs)
        options.append(f"--dtype bfloat16 (about {gb(half)})")
    if len(needs) > 1:
        options.append("one critic per process (switch the other off with --<task>-model none)")
    options += ["--tiny to try the service", "--force to load anyway"]
    return f"{names} need at least {gb(need)} on {device}, which has {gb(room)} {what}; options: " + ", ".join(options)


def _batch_warning(needs: Sequence[Need], room: float) -> str:
    per_call = sum(n.kv_per_token * n.typical_call for n in needs)
    fits = max(1, int(room // per_call)) if per_call else 0
    batch = max(n.plan.batch for n in needs)
    return (
        f"a full batch of {batch} calls may not fit beside the weights: about {gb(per_call)} of cache per typical "
        f"call, room for about {fits}; lower --max-batch-size to {fits} if scoring runs out of memory"
    )
