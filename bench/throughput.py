"""Throughput and latency of the scoring routes under closed-loop concurrent clients.

Starts `firm-serve --tiny` (or uses --url), then for each concurrency level runs C clients
that each send a request, wait for the answer and send the next, for --seconds. Prints items/s,
latency percentiles and the mean engine batch size taken from the server's /metrics.

    python bench/throughput.py                       # tiny critic, 1, 8 and 32 clients
    python bench/throughput.py --url http://gpu-box:8000 --task gen --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.images import encode
from clients.tasks import EDIT, GEN, task_spec
from tests.support import b64, metric_value, picture, running_server


@dataclass
class LevelResult:
    concurrency: int
    items: int
    errors: int
    seconds: float
    latencies: list[float]
    mean_batch: float

    def row(self) -> str:
        p50, p99 = percentile(self.latencies, 0.5), percentile(self.latencies, 0.99)
        return (
            f"{self.concurrency:>6} {self.items / self.seconds:>9.2f} {p50 * 1000:>9.0f} {p99 * 1000:>9.0f} "
            f"{self.mean_batch:>10.2f} {len(self.latencies):>9} {self.errors:>7}"
        )


HEADER = f"{'conc':>6} {'items/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10} {'requests':>9} {'errors':>7}"


SOURCE = b64("blue")
# The item this benchmark sends for each task, around a fresh image.
ITEMS: dict[str, Callable[[str], dict[str, str]]] = {
    EDIT.name: lambda image: {"source": SOURCE, "edited": image, "instruction": "Make the square red."},
    GEN.name: lambda image: {"image": image, "prompt": "a red square"},
}


def _unique_red(serial: int) -> str:
    """A red square with one pixel set from `serial`, so no judge call repeats and no cache answers."""
    image = picture("red")
    image.putpixel((0, 0), (serial % 256, serial // 256 % 256, serial // 65536 % 256))
    return encode(image)


def _body(task: str, items: int, serial: int) -> tuple[str, dict]:
    images = [_unique_red(serial * items + k) for k in range(items)]
    return task_spec(task).score_path, {"items": [ITEMS[task](image) for image in images]}


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` percentile of `values` (NaN for none), as every benchmark here reports it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def engine_batches(client: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the engine batch sizes the server has observed so far."""
    page = (await client.get("/metrics")).text
    return metric_value(page, "firm_engine_batch_size_sum"), metric_value(page, "firm_engine_batch_size_count")


async def run_level(url: str, task: str, concurrency: int, seconds: float, items: int) -> LevelResult:
    serial = concurrency * 1_000_000  # each level sends images the others did not
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        sum0, count0 = await engine_batches(client)
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors, serial
            while time.monotonic() < stop:
                serial += 1
                route, body = _body(task, items, serial)
                started = time.perf_counter()
                response = await client.post(route, json=body)
                latencies.append(time.perf_counter() - started)
                results = response.json().get("results", []) if response.status_code == 200 else []
                errors += len([r for r in results if r.get("error")]) + (0 if results else items)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        sum1, count1 = await engine_batches(client)
    mean_batch = (sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan")
    done = len(latencies) * items - errors
    return LevelResult(concurrency, done, errors, elapsed, latencies, mean_batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark a running server instead of starting firm-serve --tiny")
    parser.add_argument("--task", choices=list(ITEMS), default=EDIT.name)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client counts to run")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    parser.add_argument("--items", type=int, default=1, help="items per request")
    parser.add_argument("--cache-dir", type=Path, help="where the tiny critic is built (default: a temp dir)")
    parser.add_argument("server_args", nargs="*", help="extra firm-serve flags after --, e.g. -- --max-batch-size 32")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.url
        if url is None:
            cache = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            print(f"starting firm-serve --tiny {' '.join(args.server_args)} (building the tiny critic if needed)")
            url = stack.enter_context(running_server(cache, *args.server_args))
        print(f"task={args.task} items/request={args.items} seconds/level={args.seconds} url={url}")
        print(HEADER)
        for concurrency in args.concurrency:
            result = asyncio.run(run_level(url, args.task, concurrency, args.seconds, args.items))
            print(result.row(), flush=True)


if __name__ == "__main__":
    main()
