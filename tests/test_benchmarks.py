"""The serving benchmark runs end to end and prints its table (figures are not asserted: speed is not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serving_benchmark_smoke_run_prints_its_table() -> None:
    cmd = [sys.executable, "bench/serving.py", "--workers", "1", "2", "--seconds", "3", "--warmup", "1"]
    cmd += ["--a", "0.05", "--b", "0.001", "--side", "64", "--group", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("request bytes per candidate: group route") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["W", "cand/s"])
    assert lines[header].split() == ["W", "cand/s", "p50", "s", "p95", "s", "batch", "ideal", "/ideal", "/limit"]
    rows = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(len(row) == 8 and float(row[1]) > 0 for row in rows)
