"""Two `firm-rollout` ranks under torchrun (gloo on CPU) on the tiny text-to-image pipeline, for the tests
that check what a distributed step logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rl_workers.tiny import ensure_tiny_pipeline


def torchrun_gen_step(
    server_url: str, cache_dir: Path, prompts: Path, out: Path, *, group_size: int, flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run one training step of two ranks, one group each, against the server; the step's metrics line.

    `flags` are further `firm-rollout` flags; the run's checkpoint and metrics stay in `out`."""
    ensure_tiny_pipeline(cache_dir, "sd3")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rl_workers.cli", "--tiny",
        "--task", "gen", "--cache-dir", str(cache_dir), "--prompts", str(prompts), "--reward-url", server_url,
        "--output-dir", str(out), "--resolution", "64", "--group-size", str(group_size), "--groups-per-step", "1",
        "--sample-steps", "2", "--max-sequence-length", "16", "--score-mode", "expected", "--steps", "1",
        "--no-progress", "--no-tensorboard", *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return line
