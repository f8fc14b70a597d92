"""Serving overhead of the vllm engine: judge calls/s through firm-serve's HTTP route against
offline `vllm.LLM.generate` on the same calls, with the same engine arguments.

Both sides score the same edit items on both edit judges (execution + consistency): the same
prompts, rendered the same way, greedy, with the score digits' log-probs. The offline side takes
`VLLMEngine`'s own engine arguments and sampling parameters, so the only difference is the serving
layer (HTTP, JSON, image decoding, the judges' parsing). Each instruction is new, so the server's
cache of identical calls answers nothing. Each phase runs in a process of its own, with a time
limit, so one frees the device before the other starts.

    python bench/gpu_vllm.py                      # GPU: the tiny critic, built locally
    python bench/gpu_vllm.py --cpu                # vLLM's CPU build (bash .ci/vllm_cpu_env.sh)
    python bench/gpu_vllm.py --model /models/FIRM-Edit-8B --items 512 --concurrency 64 --side 512

Needs vllm in the Python that runs the phases: this one (`pip install -e ".[vllm]"`), or with
`--cpu` the vLLM CPU environment (FIRM_VLLM_CPU_ENV or its default place).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import percentile
from clients.images import encode
from server.judges import SCORE_TOKENS, load_judges
from server.tiny import COOL, IMAGE_SIDE, WARM, draw_square

MARKER = "FIRM-BENCH-RESULT "  # vLLM logs to stdout too: the figures follow this marker
ROOT = Path(__file__).resolve().parents[1]
CPU_VARS = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def _items(n: int, side: int) -> list[tuple[Any, Any, str]]:
    """(source, edited, instruction): half carried out, half unchanged; every instruction new."""
    cool, warm = list(COOL), list(WARM)
    out = []
    for i in range(n):
        target = warm[i % len(warm)]
        source = draw_square(cool[i % len(cool)]).resize((side, side))
        edited = draw_square(target if i % 2 == 0 else cool[i % len(cool)]).resize((side, side))
        out.append((source, edited, f"Make the square {target} (item {i})."))
    return out


def _engine(args: argparse.Namespace) -> Any:
    from server.engines.vllm import VLLMEngine

    return VLLMEngine(
        args.model,
        SCORE_TOKENS,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.cpu,
    )


def offline(args: argparse.Namespace) -> dict[str, float]:
    """Every call in one `LLM.generate`, prompts rendered as the engine renders them."""
    # The engine core in a process of its own, as AsyncLLM always runs it in firm-serve.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from transformers import AutoProcessor
    from vllm import LLM

    from server.engines.base import GenerationRequest
    from server.engines.tokens import chat_content, single_token_ids

    engine = _engine(args)
    engine_args = {k: v for k, v in engine.engine_args.items() if k != "disable_log_stats"}
    llm = LLM(**engine_args)
    engine._watch_ids = single_token_ids(llm.get_tokenizer(), SCORE_TOKENS, args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    judges = load_judges()
    prompts, params = [], []
    for source, edited, instruction in _items(args.items, args.side):
        for name in ("edit_execution", "edit_consistency"):
            parts = judges[name].prompt((source, edited), instruction=instruction)
            content, images = chat_content(parts)
            text = processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
            params.append(engine._sampling_params(GenerationRequest(parts, judges[name].max_new_tokens)))
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return {"calls_per_s": len(prompts) / elapsed, "seconds": elapsed}


async def _drive(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

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
    """The same calls through firm-serve --engine vllm, one item (two calls) per request."""
    from tests.support import running_server

    items = _items(args.items + 4, args.side)
    bodies = [{"items": [{"source": encode(s), "edited": encode(e), "instruction": text}]} for s, e, text in items]
    flags = ["--engine", "vllm", "--edit-model", args.model, "--gen-model", "none", "--prompts", "own"]
    flags += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    flags += ["--edit-gpu-memory-utilization", str(args.gpu_memory_utilization)]
    # a pixel budget that leaves the bench's images as drawn and fits their context in --max-model-len
    flags += ["--image-pixel-budget", str(max(args.side * args.side, 256 * 256))]
    flags += ["--enforce-eager"] if args.cpu else []
    with running_server(args.cache_dir, *flags, tiny=False, timeout=args.phase_timeout) as url:
        asyncio.run(_drive(url, bodies[:4], 4))  # warm-up, on items of its own
        cpu = time.process_time()
        elapsed, latencies, failures = asyncio.run(_drive(url, bodies[4:], args.concurrency))
        cpu = time.process_time() - cpu  # the clients' own CPU time, taken from the cores the server runs on
    return {
        "client_cpu_s": cpu,
        "calls_per_s": 2 * (args.items - failures) / elapsed,  # failed requests are not throughput
        "seconds": elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "failed_requests": failures,
    }


def _phase(name: str, args: argparse.Namespace, python: str) -> dict[str, float]:
    cmd = [python, __file__, "--phase", name, "--model", args.model, "--items", str(args.items)]
    cmd += ["--concurrency", str(args.concurrency), "--side", str(args.side), "--dtype", args.dtype]
    cmd += ["--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--cache-dir", str(args.cache_dir), "--phase-timeout", str(args.phase_timeout)]
    cmd += ["--cpu"] if args.cpu else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(CPU_VARS if args.cpu else {})}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"{name} phase ran past {args.phase_timeout} s:\n{(exc.stderr or '')[-4000:]}") from exc
    found = [line[len(MARKER) :] for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not found:
        raise SystemExit(f"{name} phase failed ({done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}")
    return json.loads(found[-1])


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to serve (default: the tiny critic shaped for vLLM)")
    parser.add_argument("--cpu", action="store_true", help="vLLM's CPU build, from its own environment")
    parser.add_argument("--items", type=int, default=128, help="edit items, each judged on 2 dimensions")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP clients, 1 item per request")
    parser.add_argument("--side", type=int, default=IMAGE_SIDE, help="image side in pixels (the tiny critic's)")
    parser.add_argument("--dtype", default=None, help="default: float32 with --cpu, else auto")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--phase-timeout", type=float, default=600.0, help="seconds each phase may take")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("FIRM_TEST_CACHE") or Path(tempfile.gettempdir()) / "firm-bench-cache"),
        help="where the tiny critic is built (the tests' FIRM_TEST_CACHE when set)",
    )
    parser.add_argument("--phase", choices=("offline", "http"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.cpu else "auto")
    return args


def main() -> None:
    args = _arguments()
    if args.phase:
        print(MARKER + json.dumps(offline(args) if args.phase == "offline" else http(args)), flush=True)
        return
    python = sys.executable
    if args.cpu:
        from tests.vllm.conftest import vllm_env

        python = str(vllm_env() / "bin" / "python")
    if args.model is None:
        from server.tiny import ensure_tiny_checkpoint

        args.model = str(ensure_tiny_checkpoint(args.cache_dir, shape="vllm"))
    where = "CPU build" if args.cpu else "GPU"
    print(f"vLLM {where}, model={args.model} items={args.items} concurrency={args.concurrency} side={args.side}px")
    off = _phase("offline", args, python)
    print(f"offline LLM.generate : {off['calls_per_s']:8.1f} judge calls/s ({off['seconds']:.1f} s)", flush=True)
    web = _phase("http", args, python)
    print(
        f"HTTP firm-serve      : {web['calls_per_s']:8.1f} judge calls/s ({web['seconds']:.1f} s), "
        f"p50 {web['p50_ms']:.0f} ms, p99 {web['p99_ms']:.0f} ms, failed requests {web['failed_requests']:.0f}, "
        f"HTTP clients' CPU {web['client_cpu_s']:.1f} s"
    )
    print(f"HTTP / offline       : {web['calls_per_s'] / off['calls_per_s']:8.2f}")


if __name__ == "__main__":
    main()
