"""Serving benchmark: do concurrent rollout workers' judge calls reach the engine together?

Starts firm-serve with the simulated engine of `bench/sim_engine.py` (each engine call costs
a + b * n seconds for n judge calls) and drives closed-loop GRPO-shaped load: W workers, each
scoring groups of G edit candidates (512 px JPEG) on both dimensions through the group route,
at W = 1, 8 and 32. Per W it prints candidates/s, group latency p50/p95, the mean engine batch
size, and two ratios: to the ideal for the cost model (every pending call of a round in one
engine call: W*G / (a + b*2*W*G) candidates/s) and to the engine's limit 1/(2b). It also prints
the request bytes per candidate of the group route and of the plain batch route.

    python bench/serving.py                               # simulated engine, server defaults
    python bench/serving.py --mode tiny --workers 1 4     # the transformers engine on the tiny critic
    python bench/serving.py -- --max-batch-size 64        # extra firm-serve flags after --
    python bench/serving.py --mode tiny --batch-invariant both   # throughput without and with --batch-invariant
    python bench/serving.py --watch-ring both --rounds 3  # the watch's recent-items ring off and on, interleaved
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client_overhead import photo_like
from bench.throughput import engine_batches, percentile
from clients.images import encode
from tests.support import running_server


def _images(count: int, side: int) -> list[str]:
    return [encode(photo_like(side, seed), "JPEG", 90) for seed in range(count)]


async def run_level(
    url: str, workers: int, group: int, seconds: float, images: list[str], warmup: float
) -> dict[str, float]:
    """Closed-loop load for `warmup + seconds`.

    Throughput is the sum over workers of each worker's completion rate: the groups it completed
    after its first completion in the measured window, over the time from that completion to its
    last one. Closed-loop rounds complete in bursts, so counting what started in the window and
    dividing by the window plus the tail still in flight would undercount by up to a round.
    """
    finished: list[tuple[int, float, float]] = []  # (worker, completed at, latency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=workers + 4)) as client:
        sum0, count0 = 0.0, 0.0
        measuring = time.monotonic() + warmup
        stop = measuring + seconds

        async def worker(w: int) -> None:
            step = 0
            while time.monotonic() < stop:
                step += 1
                body = {
                    "source": images[w % len(images)],
                    # a new instruction each round, so no call repeats and nothing is answered from cache
                    "instruction": f"Make the sky orange (W={workers}, worker {w}, round {step}).",
                    "candidates": [images[(w + step + k) % len(images)] for k in range(group)],
                }
                started = time.monotonic()
                response = await client.post("/v1/edit/score_group", json=body)
                response.raise_for_status()
                ended = time.monotonic()
                finished.append((w, ended, ended - started))

        async def counters_after_warmup() -> None:
            nonlocal sum0, count0
            await asyncio.sleep(warmup)
            sum0, count0 = await engine_batches(client)

        await asyncio.gather(counters_after_warmup(), *(worker(w) for w in range(workers)))
        sum1, count1 = await engine_batches(client)
    window = [f for f in finished if measuring <= f[1] <= stop]
    rate = 0.0
    for w in range(workers):
        ends = sorted(t for worker, t, _ in window if worker == w)
        if len(ends) < 2:
            raise RuntimeError(f"worker {w} completed fewer than two groups in the window: raise --seconds")
        rate += (len(ends) - 1) / (ends[-1] - ends[0])
    latencies = [latency for _, _, latency in window]
    return {
        "candidates_per_s": rate * group,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "mean_batch": (sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan"),
    }


def request_bytes(images: list[str], group: int) -> tuple[float, float]:
    """Bytes per candidate: the group route sends the source once, the batch route once per item."""
    grouped = {"source": images[0], "instruction": "Make the sky orange.", "candidates": images[1 : group + 1]}
    items = [{"source": images[0], "edited": c, "instruction": "Make the sky orange."} for c in images[1 : group + 1]]
    return len(json.dumps(grouped)) / group, len(json.dumps({"items": items})) / group


def serve_levels(
    args: argparse.Namespace, images: list[str], invariant: bool, ring: bool | None = None
) -> dict[int, dict[str, float]]:
    """Start firm-serve (with --batch-invariant when `invariant`; the watch ring off when `ring` is False, at
    its default when True), run every level, print a line per level."""
    cache = Path(tempfile.gettempdir()) / "firm-bench-cache"
    server_args = [*args.server_args, *(["--batch-invariant"] if invariant else [])]
    if ring is not None:
        server_args += ["--watch-samples", "0"] if not ring else []
        print(f"watch ring: {'on' if ring else 'off'}")
    if args.mode == "sim":
        os.environ["FIRM_SIM_A"], os.environ["FIRM_SIM_B"] = str(args.a), str(args.b)
        flags = ["--engine", "bench.sim_engine:SimulatedEngine", "--edit-model", "sim", "--gen-model", "none"]
        server = running_server(cache, *flags, *server_args, tiny=False)
    else:
        server = running_server(cache, "--gen-model", "none", *server_args)
    print(f"batch-invariant: {'on' if invariant else 'off'}")
    header = f"{'W':>4} {'cand/s':>8} {'p50 s':>7} {'p95 s':>7} {'batch':>7}"
    if args.mode == "sim":
        header += f" {'ideal':>7} {'/ideal':>7} {'/limit':>7}"
    print(header)
    levels = {}
    with server as url:
        for w in args.workers:
            levels[w] = r = asyncio.run(run_level(url, w, args.group, args.seconds, images, args.warmup))
            line = f"{w:>4} {r['candidates_per_s']:>8.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['mean_batch']:>7.1f}"
            if args.mode == "sim":
                ideal = w * args.group / (args.a + args.b * 2 * w * args.group)
                limit = 1 / (2 * args.b)
                line += f" {ideal:>7.1f} {r['candidates_per_s'] / ideal:>7.2f} {r['candidates_per_s'] / limit:>7.2f}"
            print(line, flush=True)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sim", "tiny"), default="sim", help="simulated engine or the tiny critic")
    parser.add_argument("--a", type=float, default=0.5, help="simulated cost per engine call, seconds")
    parser.add_argument("--b", type=float, default=0.01, help="simulated cost per judge call in a batch, seconds")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--group", type=int, default=8, help="candidates per GRPO group")
    parser.add_argument("--side", type=int, default=512, help="image side, pixels")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured length of each level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring, per level")
    parser.add_argument(
        "--batch-invariant",
        choices=("off", "on", "both"),
        default="off",
        help="serve without firm-serve --batch-invariant, with it, or each in turn and compare (an engine that "
        "has the mode: --mode tiny)",
    )
    parser.add_argument(
        "--watch-ring",
        choices=("default", "both"),
        default="default",
        help="'both': serve with the watch's recent-items ring off (--watch-samples 0) and on (its default), "
        "interleaved --rounds times, and compare",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the --watch-ring comparison")
    parser.add_argument("server_args", nargs="*", help="extra firm-serve flags after --")
    args = parser.parse_args()
    if args.mode == "sim" and args.batch_invariant != "off":
        parser.error("the simulated engine has no batch-invariant mode: use --mode tiny")
    images = _images(args.group + 9, args.side)
    per_group, per_item = request_bytes(images, args.group)
    print(
        f"mode={args.mode} group={args.group} side={args.side}px seconds/level={args.seconds}",
        " ".join(args.server_args),
    )
    print(f"request bytes per candidate: group route {per_group / 1024:.1f} KiB, batch route {per_item / 1024:.1f} KiB")
    if args.watch_ring == "both":
        compare_ring(args, images)
        return
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.batch_invariant]
    runs = {invariant: serve_levels(args, images, invariant) for invariant in settings}
    if len(runs) == 2:
        print("batch-invariant on / off, candidates/s:")
        for w in args.workers:
            on, off = runs[True][w]["candidates_per_s"], runs[False][w]["candidates_per_s"]
            print(f"{w:>4} {on:>8.2f} / {off:.2f} = {on / off:.2f}")


def compare_ring(args: argparse.Namespace, images: list[str]) -> None:
    """Ring off, then on, `args.rounds` times; per level the mean candidates/s of each and their ratio."""
    rates: dict[bool, dict[int, list[float]]] = {False: {}, True: {}}
    for _ in range(args.rounds):
        for ring in (False, True):
            for w, r in serve_levels(args, images, False, ring).items():
                rates[ring].setdefault(w, []).append(r["candidates_per_s"])
    print("watch ring on / off, candidates/s (mean, then median, of the rounds):")
    for w in args.workers:
        on, off = (sum(rates[ring][w]) / len(rates[ring][w]) for ring in (True, False))
        mid_on, mid_off = (statistics.median(rates[ring][w]) for ring in (True, False))
        print(
            f"{w:>4} mean {on:>8.2f} / {off:.2f} = {on / off:.3f}   "
            f"median {mid_on:.2f} / {mid_off:.2f} = {mid_on / mid_off:.3f}"
        )


if __name__ == "__main__":
    main()
