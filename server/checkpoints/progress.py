"""A download's progress in the server's own log lines: bytes done of total, rate, time left.

The hub library draws bars on stderr, which break a JSON log and say nothing to a log collector. The
server instead watches the cache folder the files are written to and logs a line every few seconds;
each line carries the figures as fields (`progress`), and the text format draws them as a bar.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("server.checkpoints.download")
REPORT_EVERY_S = 5.0


@dataclass(frozen=True)
class Progress:
    """One report: what a log line carries in its `progress` field."""

    done: int
    total: int
    rate: float  # bytes per second since the start
    left_s: float | None  # at that rate; None while nothing has arrived

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0

    def fields(self) -> dict[str, float | int | None]:
        return {
            "done_bytes": self.done,
            "total_bytes": self.total,
            "bytes_per_s": round(self.rate),
            "left_s": None if self.left_s is None else round(self.left_s),
        }


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _bytes_under(folder: Path) -> int:
    """Bytes of every file under `folder`, the partial downloads (`*.incomplete`) included."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # renamed or removed between listing and stat: the next report counts it
            continue
    return total


class DownloadProgress:
    """Reports, every `every_s`, how much of `total` bytes has arrived under `folder` since it began."""

    def __init__(self, model: str, folder: Path, total: int, *, every_s: float = REPORT_EVERY_S) -> None:
        self.model, self.folder, self.total, self.every_s = model, folder, total, every_s
        self._start_bytes = _bytes_under(folder) if folder.exists() else 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress {model}", daemon=True)

    def __enter__(self) -> DownloadProgress:
        log.info("downloading %s: %s", self.model, size(self.total), extra={"progress": self.now().fields()})
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def now(self) -> Progress:
        done = max(0, (_bytes_under(self.folder) if self.folder.exists() else 0) - self._start_bytes)
        done = min(done, self.total) if self.total else done
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else None
        return Progress(done=done, total=self.total, rate=rate, left_s=left)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            report(self.model, self.now())


def report(model: str, progress: Progress) -> None:
    left = f", about {duration(progress.left_s)} left" if progress.left_s is not None else ""
    log.info(
        "downloading %s: %s of %s (%d%%), %s/s%s",
        model,
        size(progress.done),
        size(progress.total),
        round(progress.fraction * 100),
        size(progress.rate),
        left,
        extra={"progress": progress.fields()},
    )
