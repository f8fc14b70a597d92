"""Serving overhead on a GPU: items/s through firm-serve's HTTP routes vs offline `vllm.LLM.chat`.

Both score the same edit items on both dimensions (execution + consistency) with the same
prompts, greedy decoding and score-token log-probs. The ratio HTTP / offline is what the
serving layer costs (image encoding, JSON, batching across requests). Each side runs in its own
process so one releases the GPU before the other starts.

    python bench/gpu_vllm.py                              # the tiny critic (built locally), 256 items
    python bench/gpu_vllm.py --model /models/FIRM-Edit-8B --items 512 --concurrency 64

Needs CUDA and `pip install -e ".[vllm,test]"`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import percentile
from clients.images import encode
from server.judges import SCORE_TOKENS, load_judges
from server.tiny import COOL, WARM, draw_square, ensure_tiny_checkpoint
from tests.support import running_server


def _pairs(n: int, side: int) -> list[tuple[object, object, str]]:
    cool, warm = list(COOL), list(WARM)
    out = []
    for i in range(n):
        target = warm[i % len(warm)]
        source = draw_square(cool[i % len(cool)]).resize((side, side))
        edited = draw_square(target if i % 2 == 0 else cool[i % len(cool)]).resize((side, side))
        out.append((source, edited, f"Make the square {target}."))
    return out


def offline(args: argparse.Namespace) -> dict[str, float]:
    """Score every item on both judges in one `LLM.chat` call."""
    from vllm import LLM, SamplingParams

    judges = load_judges()
    llm = LLM(
        model=args.model,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        limit_mm_per_prompt={"image": 2, "video": 0},
        mm_processor_kwargs={"max_pixels": args.side * args.side},
        enable_prefix_caching=True,
        seed=0,
    )
    tokenizer = llm.get_tokenizer()
    watch = [tokenizer.encode(t, add_special_tokens=False)[0] for t in SCORE_TOKENS]
    conversations = []
    for source, edited, instruction in _pairs(args.items, args.side):
        for name in ("edit_execution", "edit_consistency"):
            *_, text = judges[name].prompt((source, edited), instruction=instruction)
            content = [
                {"type": "image_pil", "image_pil": source},
                {"type": "image_pil", "image_pil": edited},
                {"type": "text", "text": text},
            ]
            conversations.append([{"role": "user", "content": content}])
    params = SamplingParams(temperature=0.0, seed=0, max_tokens=256, logprob_token_ids=watch)
    llm.chat(conversations[:4], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    llm.chat(conversations, params, use_tqdm=True)
    elapsed = time.perf_counter() - started
    return {"items_per_s": args.items / elapsed, "seconds": elapsed}


async def _drive(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post("/v1/edit/score", json=body)
                latencies.append(time.perf_counter() - started)
                ok = response.status_code == 200 and all(r["reward"] is not None for r in response.json()["results"])
                failures += 0 if ok else 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failures


def http(args: argparse.Namespace) -> dict[str, float]:
    bodies = [
        {"items": [{"source": encode(s, "JPEG"), "edited": encode(e, "JPEG"), "instruction": text}]}
        for s, e, text in _pairs(args.items, args.side)
    ]
    flags = ["--engine", "vllm", "--edit-model", args.model, "--gen-model", "none"]
    flags += ["--max-model-len", str(args.max_model_len), "--image-pixel-budget", str(args.side * args.side)]
    flags += ["--edit-gpu-memory-utilization", str(args.gpu_memory_utilization), "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as cache, running_server(Path(cache), *flags, tiny=False, timeout=900) as url:
        asyncio.run(_drive(url, bodies[:4], 4))  # warm-up
        elapsed, latencies, failures = asyncio.run(_drive(url, bodies, args.concurrency))
    return {
        "items_per_s": (args.items - failures) / elapsed,  # one item per request; failures are not throughput
        "seconds": elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "failed_requests": failures,
    }


def _phase(name: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--phase", name, "--model", args.model, "--items", str(args.items)]
    cmd += ["--concurrency", str(args.concurrency), "--side", str(args.side)]
    cmd += ["--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    output = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to serve (default: the tiny critic with vLLM-sized heads)")
    parser.add_argument("--items", type=int, default=256, help="edit items, each judged on 2 dimensions")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP clients, 1 item per request")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "firm-bench-cache")
    parser.add_argument("--phase", choices=("offline", "http"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(offline(args) if args.phase == "offline" else http(args)))
        return
    if args.model is None:
        args.model = str(ensure_tiny_checkpoint(args.cache_dir, shape="vllm"))
    print(f"model={args.model} items={args.items} concurrency={args.concurrency} side={args.side}px", flush=True)
    off = _phase("offline", args)
    print(f"offline LLM.chat : {off['items_per_s']:8.1f} items/s ({off['seconds']:.1f} s)", flush=True)
    web = _phase("http", args)
    print(
        f"HTTP firm-serve  : {web['items_per_s']:8.1f} items/s ({web['seconds']:.1f} s), "
        f"p50 {web['p50_ms']:.0f} ms, p99 {web['p99_ms']:.0f} ms, failed requests {web['failed_requests']:.0f}"
    )
    print(f"HTTP / offline   : {web['items_per_s'] / off['items_per_s']:8.2f}")


if __name__ == "__main__":
    main()
