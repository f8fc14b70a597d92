"""Items/s of the Ray Serve application with 1 and with 2 critic replicas, at the same concurrency.

Starts a local Ray cluster, deploys `deploy.ray` on the tiny critic with N replicas (CPU only,
`--replica-cpus` each, which is also the torch thread count Ray gives a replica), drives
closed-loop clients through the Serve endpoint for `--seconds` per setting, and prints one row
per replica count: items/s, latency percentiles and the mean engine batch size summed over
the replicas' metrics.

    python bench/ray_replicas.py                          # 1 and 2 replicas, 16 clients, edit task
    python bench/ray_replicas.py --replicas 1 2 4 --concurrency 32 --task gen --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from ray import serve

from bench.throughput import HEADER, ITEMS, run_level
from clients.tasks import EDIT
from deploy.ray.app import build_app
from deploy.ray.settings import RaySettings
from server.tiny import ensure_tiny_checkpoint
from tests.support import free_port

APP = "firm-bench"
_REPLICA = re.compile(r'deployment="Firm\w*Critic",replica="([^"]+)"')  # the critics, not the ingress


def _deploy(replicas: int, cpus: float, cache_dir: Path, server_args: dict[str, object]) -> None:
    settings = RaySettings(
        server={"tiny": True, "cache_dir": str(cache_dir), **server_args},
        num_gpus=0,
        num_cpus=cpus,
        min_replicas=replicas,
        max_replicas=replicas,
        metrics_push_interval_s=1,
    )
    serve.run(build_app(settings), name=APP, route_prefix="/")


def _settle(url: str, replicas: int) -> None:
    """Wait until /metrics lists every replica, so the batch-size sums cover them all."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(set(_REPLICA.findall(httpx.get(f"{url}/metrics").text))) >= replicas:
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to compare")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients, the same for every count")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured duration per replica count")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before each measurement")
    parser.add_argument("--task", choices=list(ITEMS), default=EDIT.name)
    parser.add_argument("--items", type=int, default=1, help="items per request")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="the replicas' micro-batcher wait")
    parser.add_argument("--cache-dir", type=Path, help="where the tiny critic is built (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # keep the table readable

    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        ensure_tiny_checkpoint(cache_dir)
        port = free_port()
        cpus = max(2, int(max(args.replicas) * args.replica_cpus + 1))
        ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            print(f"task={args.task} items/request={args.items} clients={args.concurrency} seconds={args.seconds}")
            print(f"{'replicas':>8} {HEADER}")
            for replicas in args.replicas:
                # No judge cache: the warm-up sends the same images as the measurement.
                _deploy(replicas, args.replica_cpus, cache_dir, {"max_wait_ms": args.max_wait_ms, "cache_size": 0})
                _settle(url, replicas)
                asyncio.run(run_level(url, args.task, args.concurrency, args.warmup, args.items))
                result = asyncio.run(run_level(url, args.task, args.concurrency, args.seconds, args.items))
                print(f"{replicas:>8} {result.row()}", flush=True)
                serve.delete(APP)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
