"""Images and a live `firm-serve` process for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from clients.images import encode
from server.tiny import COLOURS, IMAGE_SIDE, draw_square


def picture(colour: str) -> Image.Image:
    """The tiny critic's kind of picture: a coloured square on grey."""
    assert colour in COLOURS
    return draw_square(colour)


def b64(colour: str, image_format: str = "PNG") -> str:
    return encode(picture(colour), image_format)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


@contextmanager
def running_process(
    name: str,
    cmd: list[str],
    log_path: Path,
    ready_url: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> Iterator[None]:
    """Run `cmd` with its output in `log_path` until `ready_url` answers 200 (raising with the log's tail if
    it exits or is not ready in time), then yield; stop it with SIGTERM (a kill if it lingers) on the way out."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout:g} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.2)
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@contextmanager
def running_server(
    cache_dir: Path,
    *args: str,
    tiny: bool = True,
    timeout: float = 240.0,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start `firm-serve` (on the tiny critic unless told otherwise) on a free port, wait until ready,
    yield its URL, stop it. `python` and `env` run it elsewhere (the vLLM CPU environment)."""
    port = free_port()
    cmd = [python, "-m", "server.cli", "--cache-dir", str(cache_dir), "--port", str(port), *args]
    if tiny:
        cmd.append("--tiny")
    cache_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with running_process(
        "firm-serve", cmd, cache_dir / f"server-{port}.log", f"{url}/readyz", env=env, timeout=timeout
    ):
        yield url


__all__ = ["IMAGE_SIDE", "b64", "free_port", "metric_value", "picture", "running_process", "running_server"]
