"""Load generator: how the server holds up at and past its capacity.

Mixed traffic (by default 80% valid generation items with fresh prompts, so no cache can
answer, 10% items with a broken image, 10% malformed bodies) is sent open-loop at a target rate,
or closed-loop at a concurrency. Without --rate it first measures capacity closed-loop, then
runs open-loop at 1x, 2x and 10x of it. For each run it prints accepted items/s, the share of
429 / 503 / 504 answers, p50 / p95 / p99 latency of the accepted requests, and the server's
peak resident memory.

    python bench/load.py                                   # starts firm-serve --tiny itself
    python bench/load.py --url http://127.0.0.1:8000 --rate 50 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import percentile
from tests.support import b64, running_server

IMAGE = b64("red")


@dataclass
class Run:
    label: str
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    items: int = 0
    peak_rss_mib: float = 0.0

    def row(self) -> str:
        sent = sum(self.statuses.values()) or 1

        def pct(p: float) -> float:
            return 1000 * percentile(self.latencies, p)

        share = {code: 100 * self.statuses[code] / sent for code in (429, 503, 504)}
        return (
            f"{self.label:>12} {self.items / self.seconds:>9.1f} {sent:>7} {share[429]:>6.1f}% {share[503]:>6.1f}% "
            f"{share[504]:>6.1f}% {pct(0.5):>8.0f} {pct(0.95):>8.0f} {pct(0.99):>8.0f} {self.peak_rss_mib:>9.0f}"
        )


HEADER = (
    f"{'run':>12} {'items/s':>9} {'sent':>7} {'429':>7} {'503':>7} {'504':>7} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'peak MiB':>9}"
)


def _request(rng: random.Random, serial: int, items: int) -> tuple[dict | bytes, int]:
    """A body and how many valid items it holds."""
    roll = rng.random()
    if roll < 0.1:
        return b'{"items": [{"image": 7}]', 0  # malformed: 422
    body = {"items": [{"image": IMAGE, "prompt": f"a red square, take {serial}.{k}"} for k in range(items)]}
    if roll < 0.2:
        body["items"][0]["image"] = "aGVsbG8="  # an item-level invalid_image
        return body, items - 1
    return body, items


class MemoryWatch:
    """Peak VmRSS of a process, sampled every 0.2 s."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set() and self.pid:
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _send(client: httpx.AsyncClient, run: Run, rng: random.Random, serial: int, items: int) -> None:
    body, valid = _request(rng, serial, items)
    started = time.perf_counter()
    try:
        if isinstance(body, bytes):
            response = await client.post("/v1/gen/score", content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post("/v1/gen/score", json=body)
    except httpx.HTTPError:
        run.statuses[0] += 1
        return
    run.statuses[response.status_code] += 1
    if response.status_code == 200:
        run.latencies.append(time.perf_counter() - started)
        run.items += sum(r["reward"] is not None for r in response.json()["results"]) if valid else 0


async def open_loop(url: str, rate: float, seconds: float, items: int, label: str) -> Run:
    run, rng = Run(label, seconds), random.Random(int(rate * 1000))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=2000)) as client:
        tasks, started, serial = [], time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate)
            while serial < due:
                tasks.append(asyncio.create_task(_send(client, run, rng, serial, items)))
                serial += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    run.seconds = time.monotonic() - started
    return run


async def closed_loop(url: str, concurrency: int, seconds: float, items: int, label: str) -> Run:
    run, rng = Run(label, seconds), random.Random(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        stop, serial = time.monotonic() + seconds, 0

        async def worker() -> None:
            nonlocal serial
            while time.monotonic() < stop:
                serial += 1
                await _send(client, run, rng, serial, items)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.monotonic() - started
    return run


def _server_pid(url: str) -> int | None:
    port = url.rsplit(":", 1)[1].strip("/")
    try:
        out = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:  # no `ss` here: memory is not measured
        return None
    return int(out.split("pid=")[1].split(",")[0]) if "pid=" in out else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start firm-serve --tiny)")
    parser.add_argument("--rate", type=float, help="open-loop requests/s (default: 1x, 2x and 10x of capacity)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the capacity run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--items", type=int, default=2, help="items per request")
    parser.add_argument("server_args", nargs="*", help="firm-serve flags after --, e.g. -- --max-queue 64")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url
        if url is None:
            cache = Path(tempfile.gettempdir()) / "firm-bench-cache"
            url = stack.enter_context(running_server(cache, *args.server_args))
        pid = _server_pid(url)
        print(HEADER)
        runs: list[tuple[str, float | None]] = (
            [(f"rate {args.rate:g}/s", args.rate)] if args.rate else [("capacity", None)]
        )
        capacity = None
        while runs:
            label, rate = runs.pop(0)
            with MemoryWatch(pid) as memory:
                if rate is None:
                    run = asyncio.run(closed_loop(url, args.concurrency, args.seconds, args.items, label))
                    capacity = sum(run.statuses.values()) / run.seconds
                    runs += [(f"{m}x {capacity * m:.1f}/s", capacity * m) for m in (1, 2, 10)]
                else:
                    run = asyncio.run(open_loop(url, rate, args.seconds, args.items, label))
            run.peak_rss_mib = memory.peak if pid is not None else float("nan")  # a remote server: unknown
            print(run.row(), flush=True)
        if capacity is not None:
            print(f"capacity measured closed-loop at {args.concurrency} clients: {capacity:.1f} requests/s")


if __name__ == "__main__":
    main()
