"""A critic's checkpoint before it loads: the hub's failures said plainly and within bounds, progress
while it downloads, a memory check that refuses what cannot fit, a stop that does not wait for a
download, and `firm-serve check` saying all of it beforehand.

The hub is played by a local HTTP server (`tests.hub_standin`) that `huggingface_hub` talks to as it
would to the real one; the server runs as a real `firm-serve` process against it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from server.checkpoints.hub import Cause, CheckpointUnavailable, HubAccess, classify, list_files
from server.checkpoints.memory import Available, Need, judge
from server.engines.base import MemoryPlan
from tests.hub_standin import HubStandIn
from tests.support import free_port

if TYPE_CHECKING:
    from server.checkpoints.provision import Provisioner
    from server.lifecycle import Lifecycle

GB = 1000**3


def _repo() -> str:
    """A repository name no other test has cached (the in-process hub cache outlives a test)."""
    return f"org/tiny-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    ("mode", "cause"), [("not_found", Cause.NOT_FOUND), ("gated", Cause.GATED), ("error", Cause.HUB_ERROR)]
)
def test_each_way_the_hub_fails_is_named(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, mode: str, cause: Cause
) -> None:
    repo = _repo()
    with HubStandIn(repo, tiny_checkpoint, mode=mode) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointUnavailable) as failed:
            list_files(repo, None, HubAccess(retries=2, timeout_s=5))
    assert failed.value.cause == cause
    assert repo in str(failed.value) and "--tiny" in str(failed.value)
    listings = [r for r in hub.requests if r.startswith(f"GET /api/models/{repo}")]
    # a lasting answer (not found, gated) is not asked again; an outage is, a bounded number of times
    assert len(listings) == (3 if cause.transient else 1), hub.requests


def test_no_route_is_tried_a_bounded_number_of_times_then_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(CheckpointUnavailable) as failed:
        list_files(_repo(), None, HubAccess(retries=1, timeout_s=2))
    assert failed.value.cause == Cause.NO_ROUTE
    assert time.monotonic() - started < 10  # one wait of 1 s between the two tries, no library retrying behind
    assert "HF_HUB_OFFLINE=1" in str(failed.value) and "--tiny" in str(failed.value)


def test_offline_reads_only_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(CheckpointUnavailable) as failed:
        list_files(_repo(), None, HubAccess(retries=2, timeout_s=2, offline=True))
    assert failed.value.cause == Cause.NOT_CACHED
    assert "unset HF_HUB_OFFLINE" in str(failed.value)


def test_a_full_disk_is_said_as_such() -> None:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as full:
        wrapped = RuntimeError("download failed")
        wrapped.__cause__ = full
    cause, detail = classify(wrapped)
    assert cause == Cause.DISK_FULL and "No space" in detail
    assert "HF_HOME" in CheckpointUnavailable("m", cause, detail).describe("--edit-model")


def _need(
    label: str, parameters: int, calls: tuple[int, int] = (1000, 500), *, device: str = "cpu", batch: int = 1
) -> Need:
    plan = MemoryPlan(device, "float32", batch)
    return Need(label, f"org/{label}", parameters, plan, 100_000, largest_call=calls[0], typical_call=calls[1])


def test_two_8b_critics_in_float32_do_not_fit_24_gb_and_the_refusal_gives_both_figures() -> None:
    needs = [_need("edit", 8_800_000_000, (40_000, 5_000)), _need("gen", 8_800_000_000, (40_000, 5_000))]
    verdict = judge(needs, offered={"cpu": Available("cpu", 24 * GB, 25 * GB)})
    assert verdict.refuse is not None
    # each: 35.2 GB of weights + 4.0 GB of cache for the largest call + 1 GB of runtime, the figure compared
    assert "need at least 80.4 GB" in verdict.refuse and "has 24.0 GB" in verdict.refuse
    for option in ("a GPU", "--dtype bfloat16", "one critic per process", "--tiny", "--force"):
        assert option in verdict.refuse


def test_a_critic_that_fits_passes_and_a_batch_too_large_for_it_is_warned_of() -> None:
    fits = judge([_need("edit", 1_000_000)], offered={"cpu": Available("cpu", 8 * GB, 8 * GB)})
    assert fits.refuse is None and not any("batch" in line for line in fits.lines)
    crowded = judge(
        [_need("edit", 1_000_000, (1000, 50_000), batch=4096)], offered={"cpu": Available("cpu", 8 * GB, 8 * GB)}
    )
    assert crowded.refuse is None
    assert any("lower --max-batch-size" in line for line in crowded.lines), crowded.lines


def test_force_loads_what_the_check_refuses_and_a_large_cpu_critic_is_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from server.checkpoints.memory import MemoryRefusal
    from server.checkpoints.provision import Checkpoint, Provisioner

    huge = Checkpoint("edit", "org/edit", None, _need("edit", 10**13))  # 40 TB in float32: no machine has it
    with pytest.raises(MemoryRefusal, match="--force"):
        Provisioner(HubAccess()).check([huge])
    forced = Provisioner(HubAccess(), force=True)
    with caplog.at_level("WARNING"):
        forced.check([huge])
        forced.check([huge])
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--force: loading although") for m in said), said
    assert sum("scoring will take minutes per item" in m for m in said) == 1, said


def test_a_vllm_critic_is_held_to_its_share_of_the_gpu() -> None:
    gpu = {"cuda": Available("cuda", 80 * GB, 80 * GB)}

    def on_gpu(share: float, label: str = "edit") -> Need:
        plan = MemoryPlan("cuda", "bfloat16", 256, share=share)
        return Need(label, f"org/{label}", 8_800_000_000, plan, 147_456, largest_call=41_000, typical_call=5_000)

    verdict = judge([on_gpu(0.2)], offered=gpu)
    assert verdict.refuse is not None and "gpu-memory-utilization" in verdict.refuse
    assert judge([on_gpu(0.42)], offered=gpu).refuse is None
    # only the critic over its own share is refused; the one beside it that fits loads
    assert judge([on_gpu(0.2), on_gpu(0.42, "gen")], offered=gpu).refused == {"edit"}


# ----------------------------------------------------------------------------------------- a real server


@contextmanager
def serving(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, name: str = "server"
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`firm-serve` with `args` (its own Hugging Face cache under `tmp_path`); stopped on the way out."""
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "server.cli", "--cache-dir", str(tmp_path / "cache"), "--port", str(port), *args]
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        try:
            yield process, f"http://127.0.0.1:{port}", log_path
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def _wait_for(what: str, check: object, log_path: Path, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()  # type: ignore[operator]
        except (httpx.TransportError, OSError, ValueError, KeyError):
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen in {timeout:g} s:\n{log_path.read_text()[-4000:]}")


def _readiness(url: str) -> dict[str, object] | None:
    body = httpx.get(f"{url}/readyz", timeout=2).json()
    return body if "loading" not in body["models"].values() else None


def _messages(log_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("mode", "said"), [("no_route", "no route to the hub"), ("gated", "gated"), ("error", "answered with an error")]
)
def test_the_server_reaches_failed_within_its_bound_with_the_reason(
    tiny_checkpoint: Path, tmp_path: Path, mode: str, said: str
) -> None:
    repo = "org/tiny"
    with HubStandIn(repo, tiny_checkpoint, mode="ok" if mode == "no_route" else mode) as hub:
        endpoint = f"http://127.0.0.1:{free_port()}" if mode == "no_route" else hub.url
        args = ["--edit-model", repo, "--gen-model", "none", "--prompts", "own", "--hub-retries", "1"]
        with serving(tmp_path, *args, env={"HF_ENDPOINT": endpoint}) as (_, url, log_path):
            started = time.monotonic()
            body = _wait_for("a settled readiness", lambda: _readiness(url), log_path, timeout=60)
            took = time.monotonic() - started
            card = httpx.get(f"{url}/v1/models", timeout=5).json()["models"][0]
    assert body["models"] == {"edit": "failed", "gen": "disabled"}  # type: ignore[index]
    reason = body["failures"]["edit"]  # type: ignore[index]
    assert said in reason and repo in reason and "--tiny" in reason, reason
    assert card["state"] == "failed" and card["failure"] == reason
    assert took < 30, took  # 2 tries, 1 s apart (the server's own start-up aside)
    errors = [m for m in _messages(log_path) if m["level"] == "error"]
    assert [m["message"] for m in errors] == [f"the edit critic cannot be served: {reason}"]


def test_with_no_route_at_all_firm_serve_says_so_within_30_s(tmp_path: Path) -> None:
    """The default settings, on a machine that reaches neither the release nor the hub."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    # the release's prompts can't be had: the process stops, saying what else to do
    started = time.monotonic()
    with serving(tmp_path, "--prompt-source", nowhere, env={"HF_ENDPOINT": nowhere}, name="prompts") as (
        process,
        _,
        log_path,
    ):
        assert process.wait(timeout=30) != 0
    assert time.monotonic() - started < 30
    lines = _messages(log_path)
    assert [m["level"] for m in lines] == ["error"], log_path.read_text()
    assert "prompts pull" in lines[0]["message"] and "--tiny" in lines[0]["message"]  # type: ignore[operator]
    # prompts at hand, weights not: both critics are failed, each with its reason
    with serving(tmp_path, "--prompts", "own", env={"HF_ENDPOINT": nowhere}, name="weights") as (_, url, log_path):
        started = time.monotonic()
        body = _wait_for("a settled readiness", lambda: _readiness(url), log_path, timeout=30)
    assert time.monotonic() - started < 30
    assert set(body["models"].values()) == {"failed"}  # type: ignore[union-attr,index]
    for task, reason in body["failures"].items():  # type: ignore[union-attr,index]
        assert "no route to the hub" in reason and f"--{task}-model" in reason and "--tiny" in reason


@pytest.fixture
def heavy_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny critic with 24 MB more to download (a file no engine reads), so a download is seen going."""
    folder = tmp_path / "heavy"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "padding.safetensors").write_bytes(os.urandom(24_000_000))
    return folder


def test_a_download_reports_progress_then_loads_and_serves(heavy_checkpoint: Path, tmp_path: Path) -> None:
    with HubStandIn("org/tiny", heavy_checkpoint, mode="slow", bytes_per_s=3_000_000) as hub:
        args = ["--edit-model", "org/tiny", "--gen-model", "none", "--prompts", "own"]
        with serving(tmp_path, *args, env={"HF_ENDPOINT": hub.url}) as (_, url, log_path):
            body = _wait_for("a settled readiness", lambda: _readiness(url), log_path, timeout=120)
            card = httpx.get(f"{url}/v1/models", timeout=5).json()["models"][0]
    assert body["ready"] is True, body  # type: ignore[index]
    assert card["revision"] == "0123456789abcdef0123456789abcdef01234567"  # the commit the files came from
    lines = _messages(log_path)
    progress = [m["progress"] for m in lines if "progress" in m]
    assert progress and progress[0]["total_bytes"] > 24_000_000  # type: ignore[index,operator]
    assert any(0 < p["done_bytes"] < p["total_bytes"] and p["left_s"] is not None for p in progress), progress  # type: ignore[index,operator]
    said = [str(m["message"]) for m in lines]
    for phase in ("download took", "warm-up took", "load to cpu took"):  # each phase, with its duration
        assert any(phase in m for m in said), (phase, said)
    assert "loading org/tiny on cpu" in said, said  # loaded from the fetched files, named as the user named it
    # HF_HUB_OFFLINE=1 with the cache now filled, and no hub at all: served from the cache alone
    offline = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "1"}
    with serving(tmp_path, *args, env=offline, name="offline") as (_, url, log_path):
        body = _wait_for("a settled readiness", lambda: _readiness(url), log_path, timeout=120)
    assert body["ready"] is True, (body, log_path.read_text()[-3000:])  # type: ignore[index]
    assert any("already in the cache" in str(m["message"]) for m in _messages(log_path))


def test_sigterm_during_a_download_exits_within_the_drain_limit(heavy_checkpoint: Path, tmp_path: Path) -> None:
    with HubStandIn("org/tiny", heavy_checkpoint, mode="slow", bytes_per_s=500_000) as hub:
        args = ["--edit-model", "org/tiny", "--gen-model", "none", "--prompts", "own", "--drain-timeout-s", "10"]
        with serving(tmp_path, *args, env={"HF_ENDPOINT": hub.url}) as (process, _, log_path):
            _wait_for(
                "the download",
                lambda: any("padding.safetensors" in r and r.startswith("GET") for r in hub.requests),
                log_path,
                60,
            )
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            process.wait(timeout=30)
            took = time.monotonic() - started
    assert took < 10, took
    said = [str(m["message"]) for m in _messages(log_path)]
    assert any("download of org/tiny abandoned" in m for m in said), said


def test_a_config_that_claims_400b_parameters_is_refused_by_the_memory_check(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Over a terabyte in float32: more than any machine that runs this has, so the load is never tried."""
    big = tmp_path / "claims-400b"
    shutil.copytree(tiny_checkpoint, big)
    config = json.loads((big / "config.json").read_text())
    config["text_config"].update(
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
    )
    (big / "config.json").write_text(json.dumps(config))
    args = ["--edit-model", str(big), "--gen-model", "none", "--prompts", "own"]
    with serving(tmp_path, *args) as (_, url, log_path):
        body = _wait_for("a settled readiness", lambda: _readiness(url), log_path, timeout=60)
    reason = body["failures"]["edit"]  # type: ignore[index]
    assert "refused by the memory check" in reason and "GB on cpu, which has" in reason and "--force" in reason, reason


# ------------------------------------------------------------------------------------------ firm-serve check


def _check(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.cli", "check", "--cache-dir", str(tmp_path / "cache"), *args]
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120)


def test_check_says_what_would_happen_and_exits_by_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    fine = _check(tmp_path, "--edit-model", str(tiny_checkpoint), "--gen-model", "none", "--prompts", "own")
    assert fine.returncode == 0, fine.stdout + fine.stderr
    topics = [line.split()[1] for line in fine.stdout.splitlines() if line.startswith("ok")]
    assert {"engine", "prompts", "edit", "memory", "keys", "bind"} <= set(topics), fine.stdout
    assert "a local folder" in fine.stdout and "127.0.0.1:8000" in fine.stdout and "FAIL" not in fine.stdout

    unreachable = _check(tmp_path, "--prompts", "own", "--hub-retries", "0", env={"HF_ENDPOINT": nowhere})
    assert unreachable.returncode == 1
    failing = [line for line in unreachable.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failing) == 2 and all("no route to the hub" in line for line in failing), unreachable.stdout

    with HubStandIn("org/tiny", tiny_checkpoint) as hub:
        listed = _check(
            tmp_path,
            "--edit-model",
            "org/tiny",
            "--gen-model",
            "none",
            "--prompts",
            "own",
            env={"HF_ENDPOINT": hub.url},
        )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "to download from the hub" in listed.stdout and "not cached" in listed.stdout
    assert not any("model.safetensors" in r for r in hub.requests)  # nothing but the config was fetched

    # what firm-serve would refuse at start is a failure here too, not an "ok"
    local = ("--edit-model", str(tiny_checkpoint), "--gen-model", "none")  # built once: no critic is built here
    refused = _check(tmp_path, *local, "--structured-outputs", "--prompts", "own")
    assert refused.returncode == 1 and "--structured-outputs needs an engine" in refused.stdout, refused.stdout

    invalid = _check(tmp_path, "--port", "-1")
    assert invalid.returncode == 2 and "invalid settings" in invalid.stderr

    helped = _check(tmp_path, "--help")  # its own help, naming what it does, over the same flags
    assert helped.returncode == 0 and helped.stdout.startswith("usage: firm-serve check"), helped.stdout[:300]
    assert "loading nothing" in helped.stdout and "--edit-model" in helped.stdout


def test_check_reads_each_device_once_and_an_unreadable_one_leaves_the_rest_of_the_report(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.check as check
    import server.checkpoints.memory as memory
    from server.settings import Settings

    gen = tmp_path / "gen-critic"  # a second critic, so two engines ask for the same device
    shutil.copytree(tiny_checkpoint, gen)
    settings = Settings(
        engine="transformers",
        device="cpu",
        edit_model=str(tiny_checkpoint),
        gen_model=str(gen),
        prompts="own",
        cache_dir=tmp_path,
    )
    reads: list[str] = []

    def plenty(device: str) -> Available:
        reads.append(device)
        return Available(device, free=64 << 30, total=64 << 30)

    monkeypatch.setattr(memory, "available", plenty)
    found = check.findings(settings)
    assert reads == ["cpu"], "each device's memory is read once"
    assert [f.ok for f in found if f.topic.endswith("device")] == [True, True]
    from server.checkpoints.memory import gb

    # the estimate weighs the critics against the memory read once, not a second reading
    assert any(f.topic == "memory" and f"of {gb(64 << 30)} available" in f.text for f in found), found

    def unreadable(device: str) -> Available:
        reads.append(device)
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    reads.clear()
    monkeypatch.setattr(memory, "available", unreadable)
    found = check.findings(settings)
    assert reads == ["cpu"]
    topics = {f.topic: f for f in found}
    assert topics["edit model"].ok and topics["gen model"].ok  # both critics still reported
    devices = [f for f in found if f.topic.endswith("device")]
    assert len(devices) == 2 and not any(f.ok for f in devices) and "no CUDA-capable device" in devices[1].text
    assert "could not be read" in topics["memory"].text
    assert {"keys", "bind"} <= set(topics)  # what follows the models is still said


def test_a_device_whose_memory_cannot_be_read_leaves_the_estimate_for_the_others() -> None:
    import server.check as check
    from server.checkpoints.provision import Checkpoint, Provisioner
    from server.settings import Settings

    critics = [
        Checkpoint("edit", "org/edit", None, _need("edit", 1_000_000, device="cpu")),
        Checkpoint("gen", "org/gen", None, _need("gen", 1_000_000, device="cuda:1")),
    ]
    devices = {"cpu": Available("cpu", 8 * GB, 8 * GB), "cuda:1": "RuntimeError: CUDA error: invalid device ordinal"}
    found = check._memory(Settings(prompts="own"), Provisioner(HubAccess()), critics, devices)
    said = [f.text for f in found]
    assert "no estimate for cuda:1 (its memory could not be read)" in said, said
    assert any(text.startswith("edit critic org/edit") for text in said), said  # the read device is estimated
    assert not any("org/gen" in text for text in said), said  # nothing made up for the unread one
    assert all(f.ok for f in found)


def test_at_start_a_device_whose_memory_cannot_be_read_leaves_the_check_of_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As `firm-serve check` says: the critic on the readable device is still refused when it cannot fit."""
    import server.checkpoints.memory as memory
    from server.checkpoints.memory import MemoryRefusal
    from server.checkpoints.provision import Checkpoint, Provisioner

    def memory_of(device: str) -> Available:
        if device.startswith("cuda"):
            raise RuntimeError("CUDA error: invalid device ordinal")
        return Available(device, free=8 * GB, total=8 * GB)

    monkeypatch.setattr(memory, "available", memory_of)
    critics = [
        Checkpoint("edit", "org/edit", None, _need("edit", 10**13, device="cpu")),  # 40 TB: cannot fit 8 GB
        Checkpoint("gen", "org/gen", None, _need("gen", 1_000_000, device="cuda:1")),
    ]
    with caplog.at_level("WARNING"), pytest.raises(MemoryRefusal) as refused:
        Provisioner(HubAccess()).check(critics)
    assert refused.value.labels == {"edit"}
    assert any("no memory check for the critics on cuda:1" in r.getMessage() for r in caplog.records)


def test_a_progress_line_is_a_bar_in_text_and_fields_in_json() -> None:
    import logging

    from server.checkpoints.progress import Progress
    from server.logs import JsonFormatter, TextFormatter

    progress = Progress(done=6_000_000, total=24_000_000, rate=2_000_000, left_s=9.0)
    record = logging.LogRecord("server.checkpoints.download", logging.INFO, __file__, 1, "downloading", (), None)
    record.progress = progress.fields()
    assert "[######..................] downloading" in TextFormatter().format(record)
    fields = json.loads(JsonFormatter().format(record))["progress"]
    assert fields == {"done_bytes": 6_000_000, "total_bytes": 24_000_000, "bytes_per_s": 2_000_000, "left_s": 9}


def test_a_config_no_model_class_reads_gets_no_estimate_and_the_load_decides(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.checkpoints.provision import Provisioner
    from server.engines.transformers import TransformersEngine

    odd = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    with caplog.at_level("WARNING"):
        checkpoint = Provisioner(HubAccess()).prepare(["edit"], TransformersEngine(str(odd), ["1"], device="cpu"))
    assert checkpoint.need is None
    assert any("no estimate for" in r.getMessage() and "no_such_model" in r.getMessage() for r in caplog.records)


def _started(provisioner: Provisioner, tiny_checkpoint: Path, name: str) -> Lifecycle:
    """A lifecycle of one critic on the tiny checkpoint, started with `provisioner` in the hub's place."""
    import asyncio

    from server.engines.transformers import TransformersEngine
    from server.lifecycle import Lifecycle, TaskModel
    from server.tasks import SERVER_TASKS

    task = next(iter(SERVER_TASKS.values()))
    engine = TransformersEngine(str(tiny_checkpoint), ["1"], device="cpu")
    model = TaskModel(task=task, name=name, engine=engine, runner=None, judges=())  # type: ignore[arg-type]
    lifecycle = Lifecycle({task.name: model}, provisioner)
    asyncio.run(lifecycle.start())
    return lifecycle


def test_a_critic_whose_preparation_breaks_is_failed_with_the_reason_not_left_loading(tiny_checkpoint: Path) -> None:
    from server.checkpoints.provision import Provisioner
    from server.errors import NotReady
    from server.lifecycle import ModelState
    from server.tasks import SERVER_TASKS

    class Broken(Provisioner):
        def prepare(self, tasks: object, engine: object) -> object:  # type: ignore[override]
            raise RuntimeError("the cache folder is unreadable")

    task = next(iter(SERVER_TASKS))
    lifecycle = _started(Broken(HubAccess()), tiny_checkpoint, "tiny")
    assert lifecycle.state(task) == ModelState.FAILED
    assert "the cache folder is unreadable" in lifecycle.failures()[task]
    with pytest.raises(NotReady, match=f"the {task} model cannot be served: .*the cache folder is unreadable"):
        lifecycle.ready_model(SERVER_TASKS[task])  # what a scoring request is refused with


def test_a_stop_while_the_hub_is_asked_or_the_weights_download_is_recorded_as_abandoned(tiny_checkpoint: Path) -> None:
    """The process then exits without waiting for those threads (a download pool among them)."""
    import asyncio
    import threading

    from server.checkpoints.hub import Listing
    from server.checkpoints.provision import Checkpoint, Provisioner
    from server.engines.transformers import TransformersEngine
    from server.lifecycle import Lifecycle, TaskModel
    from server.tasks import SERVER_TASKS

    release = threading.Event()
    entered: list[str] = []

    class Stalled(Provisioner):
        def __init__(self, stall_in: str) -> None:
            super().__init__(HubAccess())
            self.stall_in = stall_in

        def _stall(self, phase: str) -> None:
            if phase == self.stall_in:
                entered.append(phase)
                release.wait(60)

        def prepare(self, tasks: object, engine: object) -> Checkpoint:  # type: ignore[override]
            self._stall("prepare")
            return Checkpoint("edit", "org/edit", Listing("org/edit", "abc", {"model.safetensors": 10}), None)

        def download(self, checkpoint: Checkpoint) -> Path | None:
            self._stall("download")
            return None

    async def stopped_during(phase: str) -> list[str]:
        task = next(iter(SERVER_TASKS.values()))
        engine = TransformersEngine(str(tiny_checkpoint), ["1"], device="cpu")
        model = TaskModel(task=task, name="tiny", engine=engine, runner=None, judges=())  # type: ignore[arg-type]
        lifecycle = Lifecycle({task.name: model}, Stalled(phase))
        starting = asyncio.create_task(lifecycle.start())
        while phase not in entered:  # the start is in the phase's thread, as the hub keeps it
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        return lifecycle.abandoned

    try:
        assert asyncio.run(stopped_during("prepare")) == [f"preparation of {tiny_checkpoint}"]
        assert asyncio.run(stopped_during("download")) == ["download of org/edit"]
    finally:
        release.set()


def test_a_download_that_breaks_off_the_hub_fails_the_critic_with_the_reason(tiny_checkpoint: Path) -> None:
    from server.checkpoints.hub import Listing
    from server.checkpoints.provision import Checkpoint, Provisioner
    from server.lifecycle import ModelState
    from server.tasks import SERVER_TASKS

    class UnwritableCache(Provisioner):
        def prepare(self, tasks: object, engine: object) -> Checkpoint:  # type: ignore[override]
            return Checkpoint("edit", "org/x", Listing("org/x", "abc", {"model.safetensors": 10}), None)

        def download(self, checkpoint: Checkpoint) -> Path | None:
            raise PermissionError(13, "Permission denied", "/cache/models--org--x")

    task = next(iter(SERVER_TASKS))
    lifecycle = _started(UnwritableCache(HubAccess()), tiny_checkpoint, "org/x")
    assert lifecycle.state(task) == ModelState.FAILED
    assert "Permission denied" in lifecycle.failures()[task] and not lifecycle.abandoned
