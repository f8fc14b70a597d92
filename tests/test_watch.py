"""The watch: its parts alone, then canaries, privacy, access and the terminal view against real servers."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.lifecycle import ModelState
from server.routes import readiness
from server.watch.canary import SCENES
from server.watch.looks import THUMBNAIL_SIDE, UNCHANGED_DISTANCE, LookMaker, data_url
from server.watch.ring import Sample, SampleRing
from server.watch.windows import Windows
from tests.support import b64, free_port, metric_value, running_process, running_server

ADMIN = "watch-admin-key-0123456789"
SCORER = "watch-scorer-key-0123456789"
SIM = ("--engine", "bench.sim_engine:SimulatedEngine", "--edit-model", "sim", "--gen-model", "sim")
DRIFT = ("--engine", "tests.drift_engine:DriftingEngine", "--edit-model", "drift", "--gen-model", "none")
FAST = {"FIRM_SIM_A": "0", "FIRM_SIM_B": "0"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen after {timeout:g} s")
        time.sleep(0.1)


def metric(url: str, name: str, **labels: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, name, **labels)


def data_url_size(url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


# --- parts --------------------------------------------------------------------------------------


def distance(before: Image.Image, after: Image.Image) -> float | None:
    """The edit distance the watch records for a source and its edit."""
    return LookMaker(thumbnails=False).make((before, after), (0, 1), {}).distance


def test_thumbnails_never_exceed_128_pixels() -> None:
    for size in [(4000, 300), (300, 4000), (129, 129), (64, 64)]:
        (small,) = LookMaker(thumbnails=True).make((Image.new("RGB", size, (10, 20, 30)),), None, {}).thumbnails
        width, height = data_url_size(data_url(small))
        assert THUMBNAIL_SIDE // 2 <= max(width, height) <= THUMBNAIL_SIDE or max(size) < THUMBNAIL_SIDE


def test_unchanged_edit_distance_threshold() -> None:
    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    assert distance(grey, Image.new("RGB", (256, 256), (255, 128, 128))) == pytest.approx(127 / (3 * 255), abs=1e-3)
    jpeg = io.BytesIO()
    grey.save(jpeg, format="JPEG", quality=75)
    assert distance(grey, Image.open(jpeg)) < UNCHANGED_DISTANCE  # a re-encoded copy is unchanged
    edited = grey.copy()
    edited.paste((220, 40, 40), (0, 0, 16, 16 * 16))  # a 16-pixel-wide stripe recoloured
    assert distance(grey, edited) > UNCHANGED_DISTANCE
    _, _, _, before, after = next(scene for scene in SCENES if scene[0] == "unchanged")
    assert distance(before(), after()) == 0.0


def _sample(seq: int, tags: tuple[str, ...] = ()) -> Sample:
    return Sample(seq, 0.0, "edit", str(seq), "text", (), {}, 0.5, None, None, False, False, tags)


def test_the_ring_is_bounded_and_newest_first() -> None:
    ring = SampleRing(3)
    for seq in range(10):
        ring.add(_sample(seq, ("low",) if seq % 2 else ()))
    assert len(ring) == 3
    assert [s.seq for s in ring.latest()] == [9, 8, 7]
    assert [s.seq for s in ring.latest(tag="low")] == [9, 7]
    assert [ring.keeps(index, 5) for index in range(5)] == [False, False, True, True, True]


def test_a_ring_of_zero_keeps_nothing_and_no_thumbnail_is_made() -> None:
    ring = SampleRing(0)
    ring.add(_sample(1))
    assert len(ring) == 0 and ring.latest() == [] and not ring.enabled
    assert not any(ring.keeps(index, 3) for index in range(3))
    image = Image.new("RGB", (64, 64))
    looks = LookMaker(thumbnails=False).make((image, image), (0, 1), {})
    assert looks.thumbnails == () and looks.unchanged  # the signal is still computed


def test_only_the_items_the_ring_can_hold_get_thumbnails_while_every_edit_gets_its_distance() -> None:
    from server.metrics import Metrics
    from server.tasks import SERVER_TASKS
    from server.watch.watch import Watch

    task = next(t for t in SERVER_TASKS.values() if t.unchanged_pair is not None)
    watch = Watch([task], Metrics(), samples=2, window_s=60, baseline_s=600)
    images = [tuple(Image.new("RGB", (64, 64), (n, 0, 0)) for _ in range(2)) for n in range(5)]
    looks = watch.look(task, [*images, None])
    assert [bool(look.thumbnails) for look in looks] == [False, False, False, False, True, False]
    assert all(look.unchanged for look in looks[:5])  # the signal is still computed for every item


def test_windows_keep_the_first_stretch_as_baseline_and_forget_old_buckets() -> None:
    windows = Windows(("a", "b"), started=0.0, window_s=100.0, baseline_s=50.0)
    for now, score in [(1.0, 5), (20.0, 5), (60.0, 3), (300.0, 1)]:
        bucket = windows.bucket(now)
        targets = [bucket, windows.baseline] if windows.in_baseline(now) else [bucket]
        for tally in targets:
            tally.items += 1
            tally.dimensions["a"].add(score, score - 0.5)
    assert windows.baseline.view()["dimensions"]["a"]["histogram"] == [0, 0, 0, 0, 2]
    assert windows.baseline.view()["dimensions"]["a"]["max_share"] == 1.0
    last = windows.window(305.0).view()["dimensions"]["a"]
    assert last["histogram"] == [1, 0, 0, 0, 0] and last["disagreement"] == 0.5
    windows.pin(305.0)
    assert windows.view(305.0)["baseline_kind"] == "pinned" and not windows.in_baseline(306.0)


def test_the_saturation_and_disagreement_gauges_read_nan_once_the_window_holds_no_score() -> None:
    import math

    from server.metrics import Metrics
    from server.tasks import SERVER_TASKS
    from server.watch.watch import Watch

    task = next(iter(SERVER_TASKS.values()))
    now = [1000.0]
    metrics = Metrics()
    watch = Watch([task], metrics, samples=0, window_s=60, baseline_s=0, clock=lambda: now[0])
    dimension = task.spec.dimensions[0]
    watch.windows[task.name].bucket(now[0]).dimensions[dimension].add(5, 4.0)
    labels = {"task": task.name, "dimension": dimension, "window": "last"}

    def gauges() -> tuple[float | None, float | None]:  # as a scrape reads them, with no page open
        get = metrics.registry.get_sample_value
        return get("firm_max_score_share", labels), get("firm_score_disagreement", labels)

    assert gauges() == (1.0, 1.0)
    now[0] += 10 * 60  # traffic stopped, nothing observed since: the window has moved past every score
    assert all(value is not None and math.isnan(value) for value in gauges()), gauges()


def test_a_degraded_model_is_ready_unless_told_otherwise() -> None:
    states = {"edit": ModelState.DEGRADED, "gen": ModelState.DISABLED}
    assert readiness(states).ready
    assert not readiness(states, degraded_ready=False).ready
    assert not readiness({"edit": ModelState.SLEEPING}).ready


# --- canaries -------------------------------------------------------------------------------------


def _canary_runs(url: str, outcome: str) -> float:
    return metric(url, "firm_canary_runs_total", task="edit", outcome=outcome)


def _sleep_wake(url: str) -> None:
    assert httpx.post(f"{url}/v1/admin/sleep", headers=AS_ADMIN).json()["models"]["edit"] == "sleeping"
    assert httpx.post(f"{url}/v1/admin/wake", headers=AS_ADMIN).json()["models"]["edit"] in ("ready", "degraded")


def _score_one(url: str) -> httpx.Response:
    item = {"source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
    return httpx.post(f"{url}/v1/edit/score", json={"items": [item]})


def test_an_engine_that_changes_after_a_wake_turns_the_model_degraded(cache_dir: Path) -> None:
    env = {"FIRM_DRIFT_AFTER_WAKES": "1"}
    with running_server(cache_dir, *DRIFT, "--admin-key", ADMIN, "--canary-every", "0", tiny=False, env=env) as url:
        wait_for("the canaries' first run", lambda: _canary_runs(url, "clean") >= 1)
        assert metric(url, "firm_canary_drift", task="edit") == 0
        _sleep_wake(url)
        wait_for("canary drift after the wake", lambda: _canary_runs(url, "drift") >= 1)
        assert metric(url, "firm_canary_drift", task="edit") == len(SCENES)  # every synthetic item moved
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["edit"] == "degraded"
        report = httpx.get(f"{url}/watch/data", headers=AS_ADMIN).json()["canaries"]["tasks"]["edit"]
        assert report["status"] == "drift" and report["reason"] == "wake"
        assert "execution: score 2, reference 4" in report["differences"]["synthetic-recolour"]
        assert _score_one(url).status_code == 200  # a degraded critic still scores
        log = next(cache_dir.glob(f"server-{url.rsplit(':', 1)[1]}.log")).read_text()
        assert "canary drift: edit item synthetic-recolour after wake" in log


def test_an_unchanged_engine_stays_clean_through_three_sleep_wake_cycles(cache_dir: Path) -> None:
    with running_server(cache_dir, *DRIFT, "--admin-key", ADMIN, "--canary-every", "0", tiny=False) as url:
        wait_for("the canaries' first run", lambda: _canary_runs(url, "clean") >= 1)
        for cycle in range(1, 4):
            _sleep_wake(url)
            wait_for(f"the canary run after wake {cycle}", lambda c=cycle: _canary_runs(url, "clean") >= 1 + c)
            assert _canary_runs(url, "drift") == 0
            assert metric(url, "firm_canary_drift", task="edit") == 0
            assert httpx.get(f"{url}/readyz").json()["models"]["edit"] == "ready"


def test_a_reference_file_that_differs_fails_readiness_when_asked(cache_dir: Path, tmp_path: Path) -> None:
    reference = {
        "edit": {f"synthetic-{scene[0]}": {"execution": {"score": 5}, "consistency": {"score": 5}} for scene in SCENES}
    }
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [*DRIFT, "--canary-reference", str(path), "--canary-fail-readiness", "--canary-every", "0.2"]
    cmd = [sys.executable, "-m", "server.cli", "--cache-dir", str(cache_dir), "--port", str(port), *args]
    with running_process("firm-serve", cmd, tmp_path / "server.log", f"{url}/healthz"):
        wait_for("canary drift against the reference file", lambda: _canary_runs(url, "drift") >= 2)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["models"]["edit"] == "degraded"
        assert httpx.get(f"{url}/watch/data").json()["canaries"]["reference_origin"] == str(path)


def test_a_users_canaries_must_get_their_scores(cache_dir: Path, tmp_path: Path) -> None:
    for name, colour in (("before", (40, 70, 220)), ("after", (220, 40, 40))):
        Image.new("RGB", (96, 96), colour).save(tmp_path / f"{name}.png")
    items = [
        {"task": task, "id": item, "images": ["before.png", "after.png"], "text": "Make it red.", "scores": scores}
        for task, item, scores in (
            ("edit", "kept", {"execution": 4, "consistency": 4}),  # what the engine answers
            ("edit", "missed", {"execution": 5}),
            ("gen", "unserved", {"quality": 5}),  # a task this server does not serve is left out
        )
    ]
    (tmp_path / "canaries.json").write_text(json.dumps({"items": items}))
    args = (*DRIFT, "--admin-key", ADMIN, "--canary-set", str(tmp_path / "canaries.json"), "--canary-every", "0")
    with running_server(cache_dir, *args, tiny=False) as url:
        wait_for("the canaries' first run", lambda: _canary_runs(url, "drift") >= 1)
        report = httpx.get(f"{url}/watch/data", headers=AS_ADMIN).json()["canaries"]["tasks"]["edit"]
        assert report["items"] == len(SCENES) + 2
        assert report["differences"] == {"user-missed": ["execution: score 4, reference 5"]}
        assert metric(url, "firm_canary_drift", task="edit") == 1


# --- privacy, access and the terminal view ----------------------------------------------------------


@pytest.fixture(scope="module")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server on the simulated engine with an audit log, a ring of 3, and every file it could write under
    one folder (its cache, its home, its temporary directory)."""
    root = tmp_path_factory.mktemp("private")
    home = root / "home"
    home.mkdir()
    env = {**FAST, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    args = (*SIM, "--watch-samples", "3", "--audit-log", str(root / "audit.jsonl"))
    with running_server(root / "cache", *args, tiny=False, env=env) as url:
        yield url, root


def _edit_items(count: int) -> list[dict[str, str]]:
    return [
        {"id": f"i{n}", "source": b64("blue"), "edited": b64("blue" if n == 0 else "red"), "instruction": f"Paint {n}"}
        for n in range(count)
    ]


def test_the_ring_holds_only_the_last_items_and_nothing_reaches_the_disk(private_server: tuple[str, Path]) -> None:
    url, root = private_server
    assert httpx.post(f"{url}/v1/edit/score", json={"items": _edit_items(6)}).status_code == 200
    data = httpx.get(f"{url}/watch/data").json()
    assert data["ring"] == {"size": 3, "held": 3}
    assert [s["item"] for s in data["samples"]] == ["i5", "i4", "i3"]
    thumbnails = [t for s in data["samples"] for t in s["thumbnails"]]
    assert thumbnails and all(max(data_url_size(t)) <= THUMBNAIL_SIDE for t in thumbnails)
    assert data["samples"][0]["scores"]["execution"]["reasoning"]  # kept for the page, not asked for by the caller
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["audit.jsonl", *(f for f in files if f.startswith("cache/server-") and f.endswith(".log"))]
    for name in files:
        text = (root / name).read_text()
        assert "data:image" not in text and all(t.split(",", 1)[1][:64] not in text for t in thumbnails), name
    audit = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 6 and not any("thumbnails" in line or "distance" in line for line in audit)


def test_the_watch_page_is_open_on_loopback_without_keys(private_server: tuple[str, Path]) -> None:
    url, _ = private_server
    page = httpx.get(f"{url}/watch")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    outside = page.text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a request
    assert "http://" not in outside and "https://" not in outside and "//" + "cdn" not in outside


def test_firm_score_watch_prints_the_signals(private_server: tuple[str, Path]) -> None:
    url, _ = private_server
    assert httpx.post(f"{url}/v1/edit/score", json={"items": _edit_items(1)}).status_code == 200
    shown = subprocess.run(
        [sys.executable, "-m", "clients.cli", "watch", url, "--once"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    for expected in ("edit", "execution", "consistency", "unchanged", "flagged", "canaries"):
        assert expected in shown.stdout, (expected, shown.stdout)


def test_the_ring_is_off_at_zero_while_the_signals_still_count(cache_dir: Path) -> None:
    with running_server(cache_dir, *SIM, "--watch-samples", "0", tiny=False, env=FAST) as url:
        assert httpx.post(f"{url}/v1/edit/score", json={"items": _edit_items(2)}).status_code == 200
        data = httpx.get(f"{url}/watch/data").json()
        assert data["ring"] == {"size": 0, "held": 0} and data["samples"] == []
        assert data["tasks"]["edit"]["window"]["flagged"] == 1
        assert metric(url, "firm_unchanged_high_score_total", task="edit") == 1


def test_with_keys_the_watch_page_needs_the_admin_key(cache_dir: Path) -> None:
    keys = ("--api-keys", f"trainer:{SCORER}", "--admin-key", ADMIN)
    with running_server(cache_dir, *SIM, *keys, tiny=False, env=FAST) as url:
        for path in ("/watch", "/watch/data"):
            refused = httpx.get(url + path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {SCORER}"}).status_code == 403
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
            assert httpx.get(url + path, auth=("anyone", ADMIN)).status_code == 200  # a browser's prompt
        pinned = httpx.post(f"{url}/v1/admin/watch/baseline", headers={"Authorization": f"Bearer {ADMIN}"})
        assert pinned.status_code == 200
        data = httpx.get(f"{url}/watch/data", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert data["tasks"]["edit"]["baseline_kind"] == "pinned"


def test_without_keys_the_watch_is_shown_on_this_machine_only() -> None:
    """A server bound wide with --insecure and no keys must not show callers' images to the network."""
    import asyncio

    from starlette.responses import PlainTextResponse

    from server.security import Authentication, KeyRing

    app = Authentication(PlainTextResponse("the page"), KeyRing(scoring={}))

    async def status(client: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(client, 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as http:
            return (await http.get("/watch")).status_code

    assert asyncio.run(status("127.0.0.1")) == 200
    assert asyncio.run(status("10.1.2.3")) == 403


def _canaries_over(engine: object, *, structured: bool = False) -> tuple[Any, Any, str]:
    """Canaries, their lifecycle and task name, over one ready edit critic served by `engine`."""
    from server.batching import DirectRunner
    from server.judges import load_judges
    from server.lifecycle import Lifecycle, TaskModel
    from server.metrics import Metrics
    from server.tasks import SERVER_TASKS
    from server.watch.canary import Canaries

    task = next(t for t in SERVER_TASKS.values() if t.unchanged_pair is not None)
    metrics = Metrics()
    runner = DirectRunner(engine, metrics, task.name, unhealthy_after=100)  # type: ignore[arg-type]
    judges = tuple(load_judges(names=task.judges).values())
    model = TaskModel(task=task, name="stand-in", engine=engine, runner=runner, judges=judges, state=ModelState.READY)  # type: ignore[arg-type]
    lifecycle = Lifecycle({task.name: model})
    return Canaries(lifecycle, metrics, tolerance=0.05, structured_outputs=structured), lifecycle, task.name


@pytest.mark.parametrize("structured", [False, True])
def test_canaries_ask_the_judges_as_traffic_does(structured: bool) -> None:
    import asyncio

    from server.engines.base import GenerationResult

    class Recording:
        """An engine that answers every judge a 4 and keeps the constraint of every request."""

        name, batches_itself, supports_constraints = "recording", True, True

        def __init__(self) -> None:
            self.constraints: list[object] = []

        async def generate(self, requests: list[object]) -> list[object]:
            self.constraints += [request.constraint for request in requests]  # type: ignore[attr-defined]
            return [GenerationResult(text='{"reasoning": "fine", "score": 4}') for _ in requests]

    engine = Recording()
    canaries, _, _ = _canaries_over(engine, structured=structured)
    asyncio.run(canaries.run("start"))
    assert engine.constraints, "the canaries asked nothing"
    assert all((constraint is not None) == structured for constraint in engine.constraints), engine.constraints


def test_a_slow_first_canary_run_goes_on_after_readiness_stops_waiting_and_close_ends_it() -> None:
    import asyncio

    from server.images import ImageLimits
    from server.metrics import Metrics
    from server.scoring import ScoringService
    from server.settings import Settings

    class Hanging:
        """A canary set whose runs hang until cancelled, noting how they began and how they ended."""

        def __init__(self) -> None:
            self.started, self.cancelled = asyncio.Event(), asyncio.Event()

        async def run(self, reason: str) -> None:
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

    async def scenario() -> None:
        service = ScoringService(
            {},
            Metrics(),
            limits=ImageLimits(),
            max_items=8,
            defaults=Settings().scoring_defaults(),
            request_timeout_s=0.05,
        )
        canaries = Hanging()
        service.add_canaries(canaries, every=0)  # type: ignore[arg-type]
        await asyncio.wait_for(service.start(), timeout=10)
        # readiness stopped waiting, the run goes on
        assert canaries.started.is_set() and not canaries.cancelled.is_set()
        assert not service.lifecycle.taking_reference
        await asyncio.wait_for(service.close(), timeout=10)
        assert canaries.cancelled.is_set()  # shutdown ends it

    asyncio.run(scenario())


def test_a_failed_canary_run_neither_becomes_the_reference_nor_marks_drift() -> None:
    import asyncio

    from server.engines.base import EngineError

    class Flaky:
        """An engine that fails its first batch whole, then answers every judge a 4."""

        name, batches_itself, supports_constraints = "flaky", True, False

        def __init__(self) -> None:
            self.calls = 0

        async def generate(self, requests: list[object]) -> list[object]:
            self.calls += 1
            if self.calls == 1:
                return [EngineError("down") for _ in requests]
            from server.engines.base import GenerationResult

            return [GenerationResult(text='{"reasoning": "fine", "score": 4}') for _ in requests]

    engine = Flaky()
    canaries, lifecycle, task = _canaries_over(engine)
    asyncio.run(canaries.run("start"))
    assert canaries.report[task]["status"] == "failed" and not canaries.reference.get(task)
    assert task not in lifecycle.degraded
    asyncio.run(canaries.run("timer"))
    assert canaries.report[task]["status"] == "clean", canaries.report[task]
    assert task not in lifecycle.degraded and canaries.reference[task]


def test_a_call_the_engine_fails_is_no_drift_but_an_answer_that_no_longer_parses_is() -> None:
    import asyncio

    from server.engines.base import EngineError, GenerationResult

    class Patchy:
        """Answers every judge a 4, except as `mode` says: its first call fails, or every answer is garbled."""

        name, batches_itself, supports_constraints = "patchy", True, False
        mode = "fine"

        async def generate(self, requests: list[object]) -> list[object]:
            fine = GenerationResult(text='{"reasoning": "fine", "score": 4}')
            answer = GenerationResult(text="I would rather not say.") if "garbled" in self.mode else fine
            if self.mode.startswith("first fails"):
                return [EngineError("one call lost"), *(answer for _ in requests[1:])]
            return [answer for _ in requests]

    engine = Patchy()
    canaries, lifecycle, task = _canaries_over(engine)
    engine.mode = "garbled"  # no answer to take as the reference: failed, not clean
    asyncio.run(canaries.run("start"))
    assert canaries.report[task]["status"] == "failed" and not canaries.reference[task]
    engine.mode = "fine"
    asyncio.run(canaries.run("timer"))
    assert canaries.report[task]["status"] == "clean"

    engine.mode = "first fails"
    asyncio.run(canaries.run("timer"))
    report = canaries.report[task]
    assert report["status"] == "clean" and not report["differences"], report
    assert len(report["unanswered"]) == 1 and report["items"] > 1
    assert task not in lifecycle.degraded

    engine.mode = "garbled"
    asyncio.run(canaries.run("timer"))
    report = canaries.report[task]
    assert report["status"] == "drift" and len(report["differences"]) == report["items"], report
    assert not report["unanswered"] and task in lifecycle.degraded

    engine.mode = "first fails, rest fine"  # a clean run with a call lost clears the drift
    asyncio.run(canaries.run("timer"))
    assert canaries.report[task]["status"] == "clean" and task not in lifecycle.degraded

    engine.mode = "first fails, rest garbled"  # and drift among the answered calls is drift
    asyncio.run(canaries.run("timer"))
    report = canaries.report[task]
    assert report["status"] == "drift" and len(report["unanswered"]) == 1 and task in lifecycle.degraded
