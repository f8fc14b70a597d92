"""Serving overhead of the vllm engine: judge calls/s through firm-serve's HTTP route against
offline `vllm.LLM.generate` on the same calls, with the same engine arguments, and against
`vllm serve` with those arguments, called as the release's own chat-completions reward client
calls its server (`openai.AsyncOpenAI`, one call per judge, images as PNG data URLs), with top-5
log-probs: what a user without this project would run.

All three score the same edit items on both edit judges (execution + consistency): the same
prompts, rendered the same way, greedy, with the score digits' log-probs. The offline side takes
`VLLMEngine`'s own engine arguments and sampling parameters and hands vLLM decoded images. Both
HTTP sides encode their images in the clock, as a trainer does: firm-serve's through the project's
own `AsyncRewardClient`, one item per request. Each instruction is new, so the server's cache of
identical calls answers nothing. Each phase runs in a process of its own, with a time limit, so
one frees the device before the other starts.

With `--groups N`, N GRPO edit groups of `--group-size` candidates at `--group-side` pixels are
then scored through firm-serve with group prefill on and off (on the tiny critic, through a copy
whose processor keeps images that large): group latency, calls/s and the share of prompt tokens
vLLM's prefix cache served.

    python bench/gpu_vllm.py                      # GPU: the tiny critic, built locally
    python bench/gpu_vllm.py --cpu                # vLLM's CPU build (bash .ci/vllm_cpu_env.sh)
    python bench/gpu_vllm.py --cpu --groups 8     # and group prefill on / off
    python bench/gpu_vllm.py --model /models/FIRM-Edit-8B --items 512 --concurrency 64 --side 512

Needs vllm in the Python that runs the phases: this one (`pip install -e ".[vllm]"`), or with
`--cpu` the vLLM CPU environment (FIRM_VLLM_CPU_ENV or its default place).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import percentile
from clients.images import encode
from server.judges import SCORE_TOKENS, load_judges
from server.tiny import COLOURS, COOL, IMAGE_SIDE, WARM, draw_square

MARKER = "FIRM-BENCH-RESULT "  # vLLM logs to stdout too: the figures follow this marker
ROOT = Path(__file__).resolve().parents[1]
CPU_VARS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
EDIT_JUDGES = ("edit_execution", "edit_consistency")
SERVED = "critic"
STEP_LIMITS = ("max_num_seqs", "max_num_batched_tokens")  # vLLM's step limits, the same on every side


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
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def _step_limits(scheduler: Any) -> dict[str, int]:
    """The step limits an engine resolved: every side runs with the same ones."""
    return {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens}


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
    limits = _step_limits(llm.llm_engine.vllm_config.scheduler_config)
    return {"calls_per_s": len(prompts) / elapsed, "seconds": elapsed, **limits}


async def _drive(
    work: list[Any], senders: Sequence[Callable[[Any], Awaitable[bool]]]
) -> tuple[float, list[float], int]:
    """One client per sender, each taking the next unit of work when its last is done; (seconds, each
    unit's latency, failed units)."""
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for unit in work:
        queue.put_nowait(unit)

    async def worker(send: Callable[[Any], Awaitable[bool]]) -> None:
        nonlocal failures
        while not queue.empty():
            unit = queue.get_nowait()
            started = time.perf_counter()
            ok = await send(unit)
            latencies.append(time.perf_counter() - started)
            failures += 0 if ok else 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return time.perf_counter() - started, latencies, failures


async def _timed(
    args: argparse.Namespace,
    items: list[Any],
    scorers: Sequence[Callable[[Any], Awaitable[bool]]],
    score_all: Callable[[list[Any]], Awaitable[int]],
) -> tuple[float, list[float], int, float]:
    """Warm up on the first 4 items, then score the rest as `--shape` says: `clients` (one client per
    scorer, one item each in turn, each item's latency) or `batch` (one call over them all, as a trainer
    scores its batch; the batch's time is its one latency). (seconds, latencies, failed items, and the
    CPU seconds the clients took meanwhile from the servers' cores)."""
    if args.shape == "clients":
        await _drive(items[:4], scorers[:4])
        cpu = time.process_time()
        elapsed, latencies, failures = await _drive(items[4:], scorers)
        return elapsed, latencies, failures, time.process_time() - cpu
    await score_all(items[:4])
    started, cpu = time.perf_counter(), time.process_time()
    failures = await score_all(items[4:])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return elapsed, [elapsed], failures, cpu


def _limits(concurrency: int) -> httpx.Limits:
    # a pooled connection is dropped before uvicorn's 5 s keep-alive ends, not reused as the server closes it
    return httpx.Limits(max_connections=concurrency, keepalive_expiry=4.0)


def _figures(args: argparse.Namespace, elapsed: float, latencies: list[float], failures: int) -> dict[str, float]:
    return {
        "calls_per_s": 2 * (args.items - failures) / elapsed,  # failed items are not throughput
        "seconds": elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "failed_items": failures,
    }


def http(args: argparse.Namespace) -> dict[str, float]:
    """The same calls through firm-serve --engine vllm, sent by the project's own client, its images encoded
    in the clock: one item (two calls) per request, or with `--shape batch` the client's own chunks."""
    from clients.client import AsyncRewardClient
    from clients.config import ClientConfig
    from tests.support import metric_value, running_server

    items = _items(args.items + 4, args.side)
    flags = ["--engine", "vllm", "--edit-model", args.model, "--gen-model", "none", "--prompts", "own"]
    flags += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    flags += ["--edit-gpu-memory-utilization", str(args.gpu_memory_utilization)]
    # a pixel budget that leaves the bench's images as drawn and fits their context in --max-model-len
    flags += ["--image-pixel-budget", str(max(args.side * args.side, 256 * 256))]
    flags += ["--enforce-eager"] if args.cpu else []
    flags += _step_limit_flags(args)

    async def run(url: str) -> tuple[float, list[float], int, float]:
        async with contextlib.AsyncExitStack() as stack:
            if args.shape == "clients":  # each client its own connection, one item per request, as trainers have
                config = ClientConfig(base_urls=(url,), timeout_s=600.0, chunk_size=1, max_in_flight=1)
                clients = [
                    await stack.enter_async_context(
                        AsyncRewardClient(config=config, http_transport=httpx.AsyncHTTPTransport(limits=_limits(1)))
                    )
                    for _ in range(args.concurrency)
                ]
            else:  # one client, its own chunking and in-flight defaults
                config = ClientConfig(base_urls=(url,), timeout_s=600.0)
                clients = [await stack.enter_async_context(AsyncRewardClient(config=config))]

            def scorer(client: AsyncRewardClient) -> Callable[[tuple[Any, Any, str]], Awaitable[bool]]:
                async def score(item: tuple[Any, Any, str]) -> bool:
                    reply = await client.score_edits(*item)
                    return all(r.reward is not None for r in reply.results)

                return score

            async def score_all(batch: list[tuple[Any, Any, str]]) -> int:
                sources, edited, instructions = (list(column) for column in zip(*batch, strict=True))
                reply = await clients[0].score_edits(sources, edited, instructions)
                return sum(r.reward is None for r in reply.results)

            return await _timed(args, items, [scorer(c) for c in clients], score_all)

    with running_server(args.cache_dir, *flags, tiny=False, timeout=args.phase_timeout) as url:
        elapsed, latencies, failures, cpu = asyncio.run(run(url))
        page = httpx.get(f"{url}/metrics").text
    limits = {name: metric_value(page, f"firm_vllm_{name}", model=args.model) for name in STEP_LIMITS}
    return {"client_cpu_s": cpu, **limits, **_figures(args, elapsed, latencies, failures)}


def _step_limit_flags(args: argparse.Namespace) -> list[str]:
    """The step limits given to this bench, as firm-serve and `vllm serve` take them."""
    flags = []
    for name in STEP_LIMITS:
        if (value := getattr(args, name)) is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _serve_command(args: argparse.Namespace, port: int) -> list[str]:
    """`vllm serve` with the vllm engine's own engine arguments."""
    engine = _engine(args).engine_args
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", args.model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", SERVED, "--dtype", engine["dtype"], "--seed", str(engine["seed"])]
    cmd += ["--max-model-len", str(engine["max_model_len"])]
    cmd += ["--gpu-memory-utilization", str(engine["gpu_memory_utilization"])]
    cmd += ["--tensor-parallel-size", str(engine["tensor_parallel_size"])]
    cmd += ["--limit-mm-per-prompt", json.dumps(engine["limit_mm_per_prompt"])]
    cmd += ["--enable-prefix-caching" if engine["enable_prefix_caching"] else "--no-enable-prefix-caching"]
    cmd += ["--enforce-eager"] if engine["enforce_eager"] else []
    cmd += _step_limit_flags(args)  # firm-serve's own, which would otherwise differ: `vllm serve` has online defaults
    # no per-step statistics and no access log, as firm-serve runs (its --log-level warning)
    return [*cmd, "--disable-log-stats", "--disable-uvicorn-access-log"]


def _data_url(image: Any) -> str:
    """An image as the release's own chat-completions reward client sends it: PNG, base64, in a data URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _expected(choice: Any) -> float | None:
    """The score a user reads from a chat completion: the written digit after "score", weighted by the
    top-5 log-probs of the token that wrote it."""
    text = choice.message.content or ""
    found = re.search(r'"score"\s*:\s*\[?\s*([1-5])', text)
    if found is None or choice.logprobs is None:
        return None
    at = 0
    for token in choice.logprobs.content:
        if at <= found.start(1) < at + len(token.token):
            tops = ((t.token.strip(), t.logprob) for t in token.top_logprobs)
            probs = {digit: math.exp(logprob) for digit, logprob in tops if digit in SCORE_TOKENS}
            total = sum(probs.values())
            return sum(int(k) * v for k, v in probs.items()) / total if total else None
        at += len(token.token)
    return None


def serve(args: argparse.Namespace) -> dict[str, float]:
    """The same calls through `vllm serve`, sent as the release's own reward client sends its calls to a
    chat-completions server (`unifiedreward_score_sglang` in its flow_grpo/rewards.py): `openai.AsyncOpenAI`,
    one call per judge, each call's images encoded as PNG data URLs in the clock, an item's calls gathered
    (with `--shape batch`, every call of the batch); with top-5 log-probs, so the expected score can be read
    as firm-serve reads it."""
    from openai import AsyncOpenAI

    from server.engines.tokens import chat_content
    from tests.support import free_port, running_process

    judges = load_judges()
    items = _items(args.items + 4, args.side)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.cache_dir / f"vllm-serve-{port}.log"

    async def run() -> tuple[float, list[float], int, float]:
        async with contextlib.AsyncExitStack() as stack:
            if args.shape == "clients":  # each client its own connections, one item's two calls at a time
                clients = [
                    await stack.enter_async_context(
                        AsyncOpenAI(
                            base_url=f"{url}/v1",
                            api_key="bench",
                            http_client=httpx.AsyncClient(limits=_limits(len(EDIT_JUDGES)), timeout=600),
                            timeout=600,
                        )
                    )
                    for _ in range(args.concurrency)
                ]
            else:  # one client, the OpenAI client's own connection limits, as the release's client has them
                clients = [
                    await stack.enter_async_context(AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", timeout=600))
                ]

            async def call(client: AsyncOpenAI, name: str, item: tuple[Any, Any, str]) -> bool:
                source, edited, instruction = item
                content, _ = chat_content(judges[name].prompt((source, edited), instruction=instruction))
                pictures = iter((source, edited))
                content = [
                    {"type": "image_url", "image_url": {"url": _data_url(next(pictures))}}
                    if c["type"] == "image"
                    else c
                    for c in content
                ]
                reply = await client.chat.completions.create(
                    model=SERVED,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=judges[name].max_new_tokens,
                    temperature=0.0,
                    seed=0,
                    logprobs=True,
                    top_logprobs=5,
                )
                return _expected(reply.choices[0]) is not None  # a call whose score can't be read is not scored

            def scorer(client: AsyncOpenAI) -> Callable[[tuple[Any, Any, str]], Awaitable[bool]]:
                async def score(item: tuple[Any, Any, str]) -> bool:
                    return all(await asyncio.gather(*(call(client, name, item) for name in EDIT_JUDGES)))

                return score

            async def score_all(batch: list[tuple[Any, Any, str]]) -> int:
                """Every call of the batch at once, as the release's client sends its batch."""
                score = scorer(clients[0])
                return (await asyncio.gather(*(score(item) for item in batch))).count(False)

            return await _timed(args, items, [scorer(c) for c in clients], score_all)

    with running_process("vllm serve", _serve_command(args, port), log_path, f"{url}/v1/models", timeout=600):
        elapsed, latencies, failures, cpu = asyncio.run(run())
    return {"client_cpu_s": cpu, **_figures(args, elapsed, latencies, failures)}


def _group_bodies(args: argparse.Namespace) -> list[dict]:
    """New groups: each its own source and candidates, told apart by their backgrounds."""
    colours = list(COLOURS)

    def picture(colour: str, shade: int) -> str:
        return encode(draw_square(colour, (shade, shade, shade)).resize((args.group_side, args.group_side)))

    return [
        {
            "source": picture("blue", 250 - g),
            "instruction": f"Make the square red (group {g}).",
            "candidates": [picture(colours[c % len(colours)], 100 + 8 * c + g % 8) for c in range(args.group_size)],
        }
        for g in range(args.groups + 1)
    ]


def groups(args: argparse.Namespace, prefill: bool) -> dict[str, float]:
    """Edit groups through firm-serve with group prefill on or off: latency, calls/s, the share of prompt
    tokens the prefix cache served."""
    from tests.support import metric_value, running_server

    bodies = _group_bodies(args)
    flags = ["--engine", "vllm", "--edit-model", args.group_model, "--gen-model", "none", "--prompts", "own"]
    flags += ["--dtype", args.dtype, "--log-level", "warning", "--cache-size", "0"]
    flags += ["--image-pixel-budget", str(args.group_side * args.group_side)]
    flags += ["--edit-gpu-memory-utilization", str(args.gpu_memory_utilization)]
    flags += ["--enforce-eager"] if args.cpu else []
    flags += ["--group-prefill" if prefill else "--no-group-prefill"]

    async def run(url: str) -> tuple[tuple[float, list[float], int], list[float], list[float]]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [  # each group in flight its own client and connection, as each trainer has
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=600, limits=_limits(1)))
                for _ in range(args.group_concurrency)
            ]

            def sender(client: httpx.AsyncClient) -> Callable[[dict], Awaitable[bool]]:
                async def score_group(body: dict) -> bool:
                    response = await client.post("/v1/edit/score_group", json=body)
                    return response.status_code == 200 and len(response.json()["results"]) == args.group_size

                return score_group

            async def counters() -> list[float]:
                text = (await clients[0].get("/metrics")).text
                return [metric_value(text, n) for n in names]

            await _drive(bodies[:1], [sender(clients[0])])  # warm-up, on a group of its own
            before = await counters()
            done = await _drive(bodies[1:], [sender(c) for c in clients])
            return done, before, await counters()

    names = ("firm_vllm_prefix_cache_hits_total", "firm_vllm_prefix_cache_queries_total")
    with running_server(args.cache_dir, *flags, tiny=False, timeout=args.phase_timeout) as url:
        (elapsed, latencies, failures), before, after = asyncio.run(run(url))
    hits, queries = (a - b for a, b in zip(after, before, strict=True))
    return {
        "calls_per_s": 2 * args.group_size * (args.groups - failures) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "cached_share": hits / queries if queries else 0.0,
        "failed_groups": failures,
    }


def _phase(name: str, args: argparse.Namespace, python: str) -> dict[str, float]:
    cmd = [python, __file__, "--phase", name, "--model", args.model, "--items", str(args.items)]
    cmd += ["--concurrency", str(args.concurrency), "--shape", args.shape, "--side", str(args.side)]
    cmd += ["--dtype", args.dtype]
    cmd += ["--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--cache-dir", str(args.cache_dir), "--phase-timeout", str(args.phase_timeout)]
    cmd += ["--groups", str(args.groups), "--group-size", str(args.group_size), "--group-side", str(args.group_side)]
    cmd += ["--group-concurrency", str(args.group_concurrency), "--group-model", str(args.group_model)]
    cmd += _step_limit_flags(args)
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
    parser.add_argument(
        "--shape",
        choices=("clients", "batch"),
        default="clients",
        help="clients: --concurrency clients, one item each in turn; batch: each side's client scores every "
        "item in one call, as a trainer scores its batch (firm-serve's client chunks it by its defaults, the "
        "release's chat-completions client sends every call at once)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP clients, 1 item per request")
    parser.add_argument("--side", type=int, default=IMAGE_SIDE, help="image side in pixels (the tiny critic's)")
    parser.add_argument("--dtype", default=None, help="default: float32 with --cpu, else auto")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--phase-timeout", type=float, default=600.0, help="seconds each phase may take")
    parser.add_argument(
        "--max-num-seqs", type=int, help="vLLM's requests per step on every side (default: firm-serve's, resolved)"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="vLLM's tokens per step on every side (default: firm-serve's)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("FIRM_TEST_CACHE") or Path(tempfile.gettempdir()) / "firm-bench-cache"),
        help="where the tiny critic is built (the tests' FIRM_TEST_CACHE when set)",
    )
    parser.add_argument("--groups", type=int, default=0, help="edit groups to score with group prefill on and off")
    parser.add_argument("--group-size", type=int, default=8, help="candidates per group")
    parser.add_argument("--group-side", type=int, default=1024, help="group images' side in pixels")
    parser.add_argument("--group-concurrency", type=int, default=2, help="groups in flight")
    parser.add_argument("--group-model", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.cpu else "auto")
    return args


PHASES: dict[str, Callable[[argparse.Namespace], dict[str, float]]] = {
    "offline": offline,
    "http": http,
    "serve": serve,
    "groups-on": lambda args: groups(args, True),
    "groups-off": lambda args: groups(args, False),
}


def main() -> None:
    args = _arguments()
    if args.phase:
        print(MARKER + json.dumps(PHASES[args.phase](args)), flush=True)
        return
    python = sys.executable
    if args.cpu:
        from tests.vllm.conftest import vllm_env

        python = str(vllm_env() / "bin" / "python")
    args.group_model = args.model
    if args.model is None:
        from server.tiny import ensure_tiny_checkpoint
        from tests.vllm.conftest import widen_images

        args.model = str(ensure_tiny_checkpoint(args.cache_dir, shape="vllm"))
        args.group_model = str(widen_images(Path(args.model), args.cache_dir, args.group_side))
    where = "CPU build" if args.cpu else "GPU"
    shape = f"concurrency={args.concurrency}" if args.shape == "clients" else "one batch"
    print(f"vLLM {where}, model={args.model} items={args.items} {shape} side={args.side}px")
    off = _phase("offline", args, python)
    print(f"offline LLM.generate : {off['calls_per_s']:8.1f} judge calls/s ({off['seconds']:.1f} s)", flush=True)
    web = _phase("http", args, python)
    print(
        f"HTTP firm-serve      : {web['calls_per_s']:8.1f} judge calls/s ({web['seconds']:.1f} s), "
        f"p50 {web['p50_ms']:.0f} ms, p99 {web['p99_ms']:.0f} ms, failed items {web['failed_items']:.0f}, "
        f"HTTP clients' CPU {web['client_cpu_s']:.1f} s",
        flush=True,
    )
    for name in STEP_LIMITS:  # `vllm serve` gets the step limits firm-serve resolved, which offline resolves alike
        if not web[name]:
            raise SystemExit(f"firm-serve's /metrics did not say its {name} (firm_vllm_{name})")
        setattr(args, name, getattr(args, name) or int(web[name]))
        if off[name] != web[name]:
            print(f"warning: offline ran with {name} {off[name]:.0f}, firm-serve with {web[name]:.0f}")
    print(f"step limits          : {args.max_num_seqs} requests, {args.max_num_batched_tokens} tokens on every side")
    peer = _phase("serve", args, python)
    print(
        f"vllm serve + client  : {peer['calls_per_s']:8.1f} judge calls/s ({peer['seconds']:.1f} s), "
        f"p50 {peer['p50_ms']:.0f} ms, p99 {peer['p99_ms']:.0f} ms, failed items {peer['failed_items']:.0f}, "
        f"HTTP clients' CPU {peer['client_cpu_s']:.1f} s"
    )
    print(f"firm-serve / offline : {web['calls_per_s'] / off['calls_per_s']:8.2f}")
    print(f"firm-serve / vllm serve: {web['calls_per_s'] / peer['calls_per_s']:6.2f}", flush=True)
    if args.groups:
        shape = f"{args.groups} edit groups of {args.group_size} at {args.group_side}px"
        print(f"{shape}, {args.group_concurrency} in flight:")
        for name in ("groups-on", "groups-off"):
            g = _phase(name, args, python)
            print(
                f"group prefill {name.removeprefix('groups-'):3}    : {g['calls_per_s']:8.1f} judge calls/s, "
                f"group p50 {g['p50_ms']:.0f} ms, prompt tokens from the prefix cache {g['cached_share']:.0%}, "
                f"failed groups {g['failed_groups']:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
