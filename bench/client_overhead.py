"""What the client itself costs per image, and items/s against 1 or several tiny-critic servers.

For calls of 64 images of 512x512 it prints, per image: encoding time (PNG and JPEG), JSON
serialisation time, request bytes, and the loopback round trip of that body to a sink that only
reads it. Then it starts --servers firm-serve --tiny processes and measures items/s through
`AsyncRewardClient` with 1 base URL and with all of them.

    python bench/client_overhead.py                  # 64 images per call, 1 and 4 servers
    python bench/client_overhead.py --servers 2 --calls 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients import AsyncRewardClient
from clients.images import Encoder
from server.tiny import ensure_tiny_checkpoint
from tests.support import running_server


def photo_like(side: int, seed: int) -> Image.Image:
    """Smooth gradients with mild noise: compresses like a photograph, not like noise or flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(3 * x + seed), np.cos(4 * y), np.sin(5 * (x + y))], axis=-1) * 0.5 + 0.5
    noisy = base * 220 + rng.normal(0, 6, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


async def sink_round_trip(body: bytes) -> float:
    """Seconds to POST `body` to a local server that reads it and answers 200."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient() as client:
        await client.post(f"http://127.0.0.1:{port}/", content=body[:1000])  # warm the connection path
        started = time.perf_counter()
        await client.post(f"http://127.0.0.1:{port}/", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - started
    server.close()
    return elapsed


def per_image_costs(images: list[Image.Image]) -> None:
    n = len(images)
    print(f"per image, for a call of {n} images of {images[0].width}x{images[0].height}:")
    print(f"{'format':>7} {'encode ms':>10} {'json ms':>8} {'KiB':>8} {'loopback ms':>12}")
    for image_format in ("PNG", "JPEG"):
        encoder = Encoder(image_format, 90)
        started = time.perf_counter()
        encoded = [encoder(image) for image in images]
        encode_s = time.perf_counter() - started
        items = [{"image": e, "prompt": "a photograph of a landscape"} for e in encoded]
        started = time.perf_counter()
        body = json.dumps({"items": items}).encode()
        json_s = time.perf_counter() - started
        wire_s = asyncio.run(sink_round_trip(body))
        print(
            f"{image_format:>7} {1000 * encode_s / n:>10.2f} {1000 * json_s / n:>8.3f} "
            f"{len(body) / n / 1024:>8.1f} {1000 * wire_s / n:>12.3f}"
        )


async def throughput(urls: list[str], images: list[Image.Image], calls: int) -> float:
    async with AsyncRewardClient(urls, chunk_size=16, max_in_flight=4, image_format="JPEG") as client:
        await client.score_generations(images[:2], "a photograph of a landscape")  # warm-up
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(client.score_generations(images, "a photograph of a landscape") for _ in range(calls))
        )
        elapsed = time.perf_counter() - started
    failed = sum(not ok for reply in replies for ok in reply.mask())
    if failed:
        print(f"  ({failed} items failed)")
    return (calls * len(images) - failed) / elapsed  # failed items are not throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per call")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--servers", type=int, default=4, help="tiny-critic servers for the many-URL run")
    parser.add_argument("--calls", type=int, default=4, help="concurrent calls per throughput run")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firm-bench-cache")
    args = parser.parse_args()
    images = [photo_like(args.side, seed) for seed in range(args.images)]
    per_image_costs(images)
    ensure_tiny_checkpoint(args.cache_dir)
    with ExitStack() as stack:
        urls = [stack.enter_context(running_server(args.cache_dir)) for _ in range(args.servers)]
        print(f"\nitems/s through AsyncRewardClient, {args.calls} concurrent calls of {args.images} images (JPEG):")
        print(f"  1 base URL : {asyncio.run(throughput(urls[:1], images, args.calls)):8.2f}")
        print(f"  {len(urls)} base URLs: {asyncio.run(throughput(urls, images, args.calls)):8.2f}")


if __name__ == "__main__":
    main()
