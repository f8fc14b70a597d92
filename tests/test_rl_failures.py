"""Rollout workers against a reward server that fails: training goes on, every rank alike.

A reward failure masks samples, it never stops a step; a server that cannot be used at all is
refused before the first step; a run that gets no reward for `max_failed_steps` steps saves and
stops. The server is scripted through httpx's MockTransport, except under torchrun, where one
rank's server is a real HTTP server answering 500.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from clients import RewardClient
from clients.retry import RetryPolicy
from rl_workers.generators import load_generator
from rl_workers.generators.base import Condition
from rl_workers.observability import MetricsLog
from rl_workers.rewards import RemoteCritic
from rl_workers.settings import RolloutSettings
from rl_workers.tiny import ensure_tiny_pipeline
from rl_workers.worker import RolloutWorker, StoppedWithoutRewards
from tests.support import picture

G = 4
RETRY = RetryPolicy(max_attempts=2, backoff_s=0.0, max_backoff_s=0.0, jitter=0.0)
Handler = Callable[[httpx.Request], httpx.Response]
MODELS = {
    "models": [
        {"task": t, "name": n, "engine": "stub", "dimensions": d, "reward": r}
        for t, n, d, r in (("gen", "FIRM-Gen", ["instruction_following", "quality"], "QMA"),
                           ("edit", "FIRM-Edit", ["execution", "consistency"], "CME"))
    ]
}  # fmt: skip


def _error(status: int) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": f"e{status}", "message": "injected"}})


def _scored(request: httpx.Request) -> httpx.Response:
    """A gen group reply whose rewards spread over [0, 1]."""
    n = len(json.loads(request.content)["images"])
    dim = {"score": 3, "expected": None, "normalized": 0.5}
    results = [{"id": str(i), "instruction_following": dim, "quality": dim, "reward": i / (n - 1), "error": None}
               for i in range(n)]  # fmt: skip
    group = {"mean": 0.5, "std": 0.1, "advantages": [0.0] * n, "scored": n}
    body = {"model": {"name": "FIRM-Gen"}, "score_mode": "argmax", "weights": {"w1": 0.4, "w2": 0.6}}
    return httpx.Response(200, json=body | {"results": results, "group": group})


class Server:
    """A scripted reward server: status routes answer well, POSTs go to `post` (a request id keeps its
    first answer, so a retry of a failed call fails again, like a fault that persists)."""

    def __init__(self, post: Callable[[int], Handler], models: dict[str, Any] | None = None, ready: int = 200):
        self.post, self.models, self.ready = post, models or MODELS, ready
        self.calls: dict[str, Handler] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            states = {"gen": "ready" if self.ready == 200 else "loading", "edit": "failed"}  # edit's state is not gen's
            return httpx.Response(self.ready, json={"ready": self.ready == 200, "models": states})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=self.models)
        call = request.headers["x-request-id"]
        answer = self.calls.setdefault(call, self.post(len(self.calls)))
        return answer(request)


def _critic(handler: Callable[[httpx.Request], httpx.Response], task: str = "gen") -> RemoteCritic:
    transport = httpx.MockTransport(handler)
    client = RewardClient("http://critic", http_transport=transport, retry=RETRY, cooldown_s=0.0)
    return RemoteCritic(task, client=client)


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        (lambda r: _error(401), "refused the API key"),
        (Server(lambda i: _scored, models={"models": MODELS["models"][1:]}), "does not serve the gen critic"),
        (Server(lambda i: _scored, ready=503), "is not ready to score with the gen critic: it is loading"),
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused")), "cannot reach the reward server"),
        (lambda r: httpx.Response(200, text="<html>"), "did not list its critics"),
    ],
)
def test_an_unusable_server_is_named_before_training(handler: Handler, words: str) -> None:
    critic = _critic(handler)
    try:
        assert words in (critic.problem() or "")
    finally:
        critic.close()
    usable = _critic(Server(lambda i: _scored))
    try:
        assert usable.problem() is None
    finally:
        usable.close()


def test_firm_rollout_refuses_to_start_without_a_server(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a red square\n")
    cmd = [sys.executable, "-m", "rl_workers.cli", "--prompts", str(tmp_path / "p.txt"), "--reward-url",
           "http://127.0.0.1:9", "--output-dir", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "cannot reach the reward server at http://127.0.0.1:9" in done.stderr
    assert not (tmp_path / "out").exists()  # it stopped before loading a model or writing anything


def _settings(cache_dir: Path, tmp_path: Path, **extra: Any) -> RolloutSettings:
    ensure_tiny_pipeline(cache_dir, "sd3")
    (tmp_path / "p.txt").write_text("a red square\n")
    fields = {"resolution": 64, "group_size": G, "groups_per_step": 2, "sample_steps": 2, "max_sequence_length": 16,
              "progress": False, "tensorboard": False, "updates_per_step": 1, "kl_beta": 0.0} | extra  # fmt: skip
    return RolloutSettings(task="gen", tiny=True, cache_dir=cache_dir, prompts=tmp_path / "p.txt",
                           output_dir=tmp_path / "out", **fields)  # fmt: skip


def _run(settings: RolloutSettings, server: Server) -> list[dict[str, Any]]:
    """Run a worker against `server`; returns the lines of its metrics.jsonl."""
    critic = _critic(server)
    metrics = MetricsLog(settings.output_dir, tensorboard=False, wandb_project=None, config={})
    condition = Condition("a red square", id="c")
    worker = RolloutWorker(settings, load_generator(settings, torch.device("cpu")), critic, iter([condition] * 99),
                           metrics=metrics)  # fmt: skip
    try:
        worker.run()
    finally:
        metrics.close()
        critic.close()
    return [json.loads(line) for line in (settings.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_half_the_calls_failing_trains_on_the_other_half(
    cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(lambda i: _scored if i % 2 == 0 else (lambda r: _error(500)))
    with caplog.at_level(logging.WARNING):
        (line,) = _run(_settings(cache_dir, tmp_path, steps=1), server)
    assert line["reward/failed_fraction"] == 0.5 and line["groups/total"] == 2 and line["reward/scored"] == G
    assert line["train/samples"] == G and line["train/optimizer_steps"] == 1  # the scored group trained
    assert "step 1: 50% of rewards failed" in caplog.text


def test_a_run_without_rewards_saves_and_stops(cache_dir: Path, tmp_path: Path) -> None:
    # steps 1, 3 and 4 get no reward; step 2 does, which resets the count: the run stops after step 4
    outcome = {1: False, 2: True, 3: False, 4: False}
    step = {"n": 0}

    def post(i: int) -> Handler:
        step["n"] = i // 2 + 1  # two groups per step
        return _scored if outcome.get(step["n"], True) else (lambda r: _error(502))

    settings = _settings(cache_dir, tmp_path, steps=9, max_failed_steps=2, save_every=0)
    with pytest.raises(StoppedWithoutRewards, match="no reward came back for 2 consecutive steps") as stopped:
        _run(settings, Server(post))
    lines = [json.loads(x) for x in (settings.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert [x["reward/failed_fraction"] for x in lines] == [1.0, 0.0, 1.0, 1.0]
    assert lines[0]["reward/mean"] is None and lines[0]["train/loss"] is None  # unknown, not 0 and not NaN
    assert (settings.output_dir / "checkpoint-4" / "pytorch_lora_weights.safetensors").exists()
    assert "checkpoint-4" in str(stopped.value)


class _Failing(BaseHTTPRequestHandler):
    """A reward server whose status routes answer like `upstream`'s but whose scoring answers 500."""

    upstream = ""

    def do_GET(self) -> None:
        response = httpx.get(
            self.upstream + self.path, headers={"Authorization": self.headers.get("Authorization", "")}
        )
        self._send(response.status_code, response.content)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(500, b'{"error": {"code": "internal_error", "message": "injected"}}')

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def failing_server(upstream: str) -> Iterator[str]:
    handler = type("Failing", (_Failing,), {"upstream": upstream})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


RANK_URLS = """\
import os, sys
rank = os.environ["RANK"]
os.environ["FIRM_RL_REWARD_URL"] = os.environ[f"TEST_URL_{rank}"]
os.environ["FIRM_TIMEOUT_S"] = os.environ.get(f"TEST_TIMEOUT_{rank}", "600")
from rl_workers.cli import main
main(sys.argv[1:])
"""


def _torchrun(tmp_path: Path, cache_dir: Path, urls: list[str], prompts: Path, steps: int = 1) -> Any:
    """Two ranks under torchrun (gloo on CPU), rank r scored by urls[r]."""
    ensure_tiny_pipeline(cache_dir, "sd3")
    script = tmp_path / "rank_urls.py"
    script.write_text(RANK_URLS)
    env = dict(__import__("os").environ, TEST_URL_0=urls[0], TEST_URL_1=urls[1], TEST_TIMEOUT_1="4")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), "--tiny",
        "--task", "gen", "--cache-dir", str(cache_dir), "--prompts", str(prompts), "--output-dir",
        str(tmp_path / "ddp"), "--resolution", "64", "--group-size", str(G), "--groups-per-step", "1",
        "--sample-steps", "2", "--max-sequence-length", "16", "--score-mode", "expected", "--steps", str(steps),
        "--no-progress", "--no-tensorboard", "--adv-std", "global",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent.parent)


def test_torchrun_rank_whose_server_answers_500_keeps_pace(server_url: str, cache_dir: Path, tmp_path: Path) -> None:
    """Rank 1's server answers every scoring call with 500: both ranks finish the step together, rank 0's
    group trains, and the figures count rank 1's samples as failed."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square on a grey background\na blue square on a grey background\n")
    with failing_server(server_url) as failing:
        done = _torchrun(tmp_path, cache_dir, [server_url, failing], prompts)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert line["groups/total"] == 2 and line["reward/failed_fraction"] == 0.5 and line["reward/scored"] == G
    assert line["train/samples"] in (0, G)  # rank 0's group, unless the tiny critic tied it
    assert "HTTP 500" in done.stderr


def test_torchrun_rank_without_a_server_stops_every_rank(server_url: str, cache_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    done = _torchrun(tmp_path, cache_dir, [server_url, "http://127.0.0.1:9"], prompts)
    assert done.returncode != 0
    assert "cannot reach the reward server at http://127.0.0.1:9" in done.stderr
    assert "1 other rank(s) cannot use their reward server" in done.stderr  # rank 0 did not wait forever


def test_an_unexpected_error_in_a_call_is_failed_samples_not_a_raise(caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug below the client")

    critic = _critic(Server(lambda i: broken))
    try:
        with caplog.at_level(logging.ERROR):
            rewards = critic.submit(Condition("a red square"), [picture("red")] * 3).result()
    finally:
        critic.close()
    assert rewards.rewards == [None] * 3 and rewards.failed == 3
    assert rewards.components == {"instruction_following": [None] * 3, "quality": [None] * 3}
    assert all("RuntimeError: a bug below the client" in e for e in rewards.errors)
    assert "scoring a group failed unexpectedly" in caplog.text  # logged with its traceback, not silent
