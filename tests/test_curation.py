"""Both curation pipelines end to end against an OpenAI-compatible stand-in for the teacher models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from server.engines.base import GenerationResult
from server.judges import load_judges
from tests.curation_stub import COMPLETION_TOKENS, PROMPT_TOKENS, StubServer, url_digest
from training.curation.chat import ChatClient, Endpoint, image_data_url
from training.curation.cli import PIPELINES, run
from training.curation.runner import run_pipeline
from training.curation.store import RecordStore
from training.manifest import Row
from training.records import record_answer, record_images

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture(autouse=True)
def healthy(stub: StubServer) -> None:
    stub.reset()


def _square(path: Path, shade: int) -> str:
    image = Image.new("RGB", (32, 32), (235, 235, 235))
    image.paste((shade, 40, 255 - shade), (8, 8, 24, 24))
    image.save(path)
    return path.name


def edit_manifest(folder: Path, instructions: list[str]) -> Path:
    """One edit item per instruction, each with images of its own (their hashes identify the item)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, instruction in enumerate(instructions):
        source = _square(folder / "images" / f"src{i}.png", 3 * i)
        edited = _square(folder / "images" / f"out{i}.png", 3 * i + 1)
        lines.append(
            {"id": f"e{i}", "source": f"images/{source}", "edited": f"images/{edited}", "instruction": instruction}
        )
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


# the stub's teacher model of each step of either pipeline
STUB_MODELS = {"describe": "describer", "grade": "grader", "plan": "planner", "check": "checker"}


def curate(task: str, stub: StubServer, manifest: Path, output: Path, *extra: str) -> int:
    args = [task, str(manifest), "--output", str(output), "--base-url", stub.url, "--no-progress"]
    for step, _ in PIPELINES[task].steps:
        args += [f"--{step}-model", STUB_MODELS[step]]
    return run([*args, "--backoff-s", "0.01", "--max-retries", "3", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_edit_records_are_the_servers_prompts_with_answers_its_parser_reads_back(
    stub: StubServer, tmp_path: Path
) -> None:
    manifest = edit_manifest(tmp_path / "data", [f"Make the square red (score={n})." for n in (5, 4, 2)])
    output = tmp_path / "out" / "edit.jsonl"
    assert curate("edit", stub, manifest, output) == 0

    records = read_jsonl(output)
    judges = load_judges()
    assert sorted(r["id"] for r in records) == sorted(f"e{i}/{j}" for i in range(3) for j in judges if "edit" in j)
    for record in records:
        judge = judges[record["judge"]]
        n = int(record["fields"]["instruction"].split("score=")[1][0])
        want = n if record["judge"] == "edit_execution" else 6 - n
        # the prompt is exactly what the server sends: source image, edited image, the rendered template
        content = record["messages"][0]["content"]
        assert [p["type"] for p in content] == ["image", "image", "text"]
        assert content[2]["text"] == judge.prompt((), **record["fields"])[0]
        i = record["item_id"][1:]
        assert [(output.parent / p).resolve() for p in record_images(record)] == [
            (manifest.parent / "images" / f"{name}{i}.png").resolve() for name in ("src", "out")
        ]
        # the answer is in the judge's format, and the server's parser reads the intended score back
        assert judge.judge(GenerationResult(text=record_answer(record))).scores == {"score": want}
        assert record["score"] == want
        assert record["evidence"]["differences"].startswith("1. The square")

    summary = json.loads((tmp_path / "out" / "edit.summary.json").read_text())
    assert summary["items"]["in_output"] == summary["items"]["written_this_run"] == 3
    assert summary["score_histogram"]["edit_execution"] == {"1": 0, "2": 1, "3": 0, "4": 1, "5": 1}
    assert summary["score_histogram"]["edit_consistency"] == {"1": 1, "2": 1, "3": 0, "4": 1, "5": 0}
    assert summary["tokens"]["total"] == 6 * (PROMPT_TOKENS + COMPLETION_TOKENS)  # two calls per item
    # step 1 sees the two images but not the instruction: it describes, it does not judge
    describe = [c for c in stub.calls if c["model"] == "describer"]
    assert all(len(c["images"]) == 2 and "score=" not in c["text"] for c in describe)


def test_gen_records_teach_the_analysis_without_the_checklist_in_the_prompt(stub: StubServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = [
        {"uid": "g0", "picture": _square(data / "a.png", 10), "text": "a red square (score=5)"},
        {"uid": "g1", "picture": _square(data / "b.png", 90), "text": "a blue square (score=2)", "requirement": "flat"},
    ]
    manifest = data / "prompts.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "gen.jsonl"
    fields = ["--field", "image=picture", "--field", "prompt=text", "--id-field", "uid"]
    assert curate("gen", stub, manifest, output, *fields) == 0

    judge = load_judges()["gen_instruction_following"]
    records = {r["item_id"]: r for r in read_jsonl(output)}
    assert set(records) == {"g0", "g1"}
    assert records["g0"]["fields"] == {"prompt": "a red square (score=5)", "requirement": ""}
    for item_id, want in (("g0", 5), ("g1", 2)):
        record = records[item_id]
        text = record["messages"][0]["content"][-1]["text"]
        assert text == judge.prompt((), **record["fields"])[0]
        assert "the asked colour" not in text and record["evidence"]["checklist"][0] == "a square"
        answer = record_answer(record)
        # the released format: the requirements one by one, the final analysis, the rating line, the box
        assert answer.startswith("1. **a square**:\n- Met: a square is in the centre.\n")
        assert "\n**Final Analysis**:\n" in answer
        assert answer.endswith(f"**Final Alignment Rating: {want}**\n\\boxed{{{want}}}")
        assert judge.judge(GenerationResult(text=answer)).scores == {"score": want}
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["score_histogram"] == {"gen_instruction_following": {"1": 0, "2": 1, "3": 0, "4": 0, "5": 1}}


def test_failures_are_retried_counted_and_left_for_the_next_run(stub: StubServer, tmp_path: Path) -> None:
    instructions = ["Make it red (score=4).", "Make it ALWAYS_FAIL red.", "Make it GARBLE red.", "Paint it (score=3)."]
    manifest = edit_manifest(tmp_path, instructions)
    output = tmp_path / "edit.jsonl"
    stub.reset(fail_next=3)  # passing trouble: retried with backoff until it answers
    assert curate("edit", stub, manifest, output, "--concurrency", "1") == 1

    assert sorted({r["item_id"] for r in read_jsonl(output)}) == ["e0", "e3"]
    summary = json.loads((tmp_path / "edit.summary.json").read_text())
    failures = {f["id"]: f["error"] for f in summary["failures"]}
    assert set(failures) == {"e1", "e2"}
    assert "HTTP 500" in failures["e1"] and "ReplyError" in failures["e2"]
    assert summary["items"]["failed_this_run"] == 2
    assert summary["tokens"]["by_step"]["describe"]["retries"] + summary["tokens"]["by_step"]["grade"]["retries"] >= 3
    assert sum(summary["score_histogram"]["edit_execution"].values()) == 2  # failures are not scores

    stub.reset()
    assert curate("edit", stub, manifest, output) == 1  # the done items are skipped, the failed ones tried again
    graded = {c["text"].split("Editing instruction: ")[1].split("\n")[0] for c in stub.calls if c["model"] == "grader"}
    assert graded == {"Make it ALWAYS_FAIL red.", "Make it GARBLE red."}
    assert Counter(r["item_id"] for r in read_jsonl(output)) == {"e0": 2, "e3": 2}


def test_an_interrupted_run_resumes_with_nothing_done_twice_and_nothing_lost(stub: StubServer, tmp_path: Path) -> None:
    count = 12
    manifest = edit_manifest(tmp_path, [f"Make square {i} red (score={1 + i % 5})." for i in range(count)])
    output = tmp_path / "edit.jsonl"
    stub.reset(delay=0.15)
    args = ["edit", str(manifest), "--output", str(output), "--base-url", stub.url, "--describe-model", "describer"]
    args += ["--grade-model", "grader", "--concurrency", "2", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "training.curation.cli", *args], cwd=ROOT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not output.exists() or len(output.read_text().splitlines()) < 6:  # three items written
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was interrupted"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    done_before = {r["item_id"] for r in read_jsonl(output)}
    assert 3 <= len(done_before) < count
    undone = next(f"e{i}" for i in range(count) if f"e{i}" not in done_before)
    with open(output, "a") as torn:  # what a crash in the middle of a write leaves behind
        torn.write(json.dumps({"item_id": undone, "judge": "edit_execution"})[:30])

    stub.reset()
    assert curate("edit", stub, manifest, output) == 0

    records = read_jsonl(output)
    assert Counter(r["id"] for r in records) == {
        f"e{i}/{j}": 1 for i in range(count) for j in ("edit_execution", "edit_consistency")
    }
    sent = {digest for call in stub.calls for digest in call["images"]}
    for i in range(count):
        was_sent = url_digest(image_data_url(tmp_path / "images" / f"src{i}.png")) in sent
        assert was_sent == (f"e{i}" not in done_before), f"e{i}: done before the interruption = {not was_sent}"
    summary = json.loads((tmp_path / "edit.summary.json").read_text())
    assert summary["items"]["skipped_as_done"] == len(done_before)
    assert summary["repaired_lines"] == 1


def test_an_undecodable_reply_and_a_too_long_answer_fail_their_items_only(stub: StubServer, tmp_path: Path) -> None:
    # 800 characters is about 230 tokens: too close to the served critic's 256 for the default limit
    manifest = edit_manifest(tmp_path, ["Make it red (score=4).", "Make it BADGZIP red.", "Make it LONG red."])
    output = tmp_path / "edit.jsonl"
    assert curate("edit", stub, manifest, output) == 1

    assert {r["item_id"] for r in read_jsonl(output)} == {"e0"}
    summary = json.loads((tmp_path / "edit.summary.json").read_text())
    failures = {f["id"]: f["error"] for f in summary["failures"]}
    assert failures["e1"].startswith("ChatError") and "DecodingError" in failures["e1"]
    assert failures["e2"].startswith("AnswerMismatch") and "over --max-answer-chars 700" in failures["e2"]
    assert summary["tokens"]["by_step"]["grade"]["retries"] == 3  # an undecodable body is retried like a 503
    assert summary["aborted"] is None


def test_an_unexpected_error_stops_the_run_and_the_summary_still_says_what_was_done(tmp_path: Path) -> None:
    class Buggy:
        task, judges, required = "edit", ("edit_execution",), ()

        def __init__(self) -> None:
            self.client = ChatClient(Endpoint("http://127.0.0.1:9/v1", "unused"))

        def clients(self) -> dict[str, ChatClient]:
            return {"grade": self.client}

        async def curate(self, row: Row) -> list[dict]:
            if row.id == "bug":
                raise ValueError("a bug in the pipeline, not a bad item")
            return [{"id": f"{row.id}/edit_execution", "item_id": row.id, "judge": "edit_execution", "score": 3}]

    rows = [Row(id=name, line=n, values={}) for n, name in enumerate(["ok", "bug", "later"], 1)]
    summary_path = tmp_path / "edit.summary.json"
    with RecordStore(tmp_path / "edit.jsonl", 1) as store, pytest.raises(ValueError, match="a bug in the pipeline"):
        asyncio.run(run_pipeline(Buggy(), rows, store, summary_path, workers=1, progress=False))

    summary = json.loads(summary_path.read_text())
    assert summary["aborted"] == "ValueError: a bug in the pipeline, not a bad item"
    assert summary["items"]["written_this_run"] == 1 and summary["items"]["failed_this_run"] == 0
    assert [r["item_id"] for r in read_jsonl(tmp_path / "edit.jsonl")] == ["ok"]


def test_a_judge_template_of_ones_own_renders_the_records_and_is_read_once(
    stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "execution.txt"
    template.write_text("Our own rubric. Did the edit do this: {prompt}\nAnswer in JSON.")
    reads: Counter[Path] = Counter()
    read_text = Path.read_text

    def counted(path: Path, *args: object, **kwargs: object) -> str:
        reads[path] += 1
        return read_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", counted)
    manifest = edit_manifest(tmp_path / "data", [f"Make the square red (score={n})." for n in (5, 4, 2)])
    output = tmp_path / "edit.jsonl"
    assert curate("edit", stub, manifest, output, "--template", f"edit_execution={template}") == 0

    records = read_jsonl(output)
    consistency = load_judges()["edit_consistency"]
    for record in records:
        text, instruction = record["messages"][0]["content"][-1]["text"], record["fields"]["instruction"]
        if record["judge"] == "edit_execution":
            assert text == f"Our own rubric. Did the edit do this: {instruction}\nAnswer in JSON."
        else:
            assert text == consistency.prompt((), instruction=instruction)[0]
    assert len(records) == 6 and reads[template] == 1


def test_records_rendered_with_the_release_prompts_are_what_firm_train_accepts_for_them(
    stub: StubServer, tmp_path: Path
) -> None:
    """--prompts firm renders records with the release's prompts (a fixture in its layout stands in),
    and firm-train, told the same set, accepts them."""
    from server.prompts.release import PromptSource
    from server.prompts.sets import ReleasedPrompts
    from tests.test_prompts import EDIT_FILE, FIXTURE, _module
    from training.prompt_set import check_records, training_judges

    manifest = edit_manifest(tmp_path / "data", ["Make the square red (score=4)."])
    output = tmp_path / "edit.jsonl"
    release = ["--prompt-source", str(FIXTURE), "--allow-prompt-drift", "--cache-dir", str(tmp_path / "cache")]
    assert curate("edit", stub, manifest, output, "--prompts", "firm", *release) == 0
    records = read_jsonl(output)
    execution = next(r for r in records if r["judge"] == "edit_execution")
    released = _module(EDIT_FILE.path).SCORE_EXECUTION
    assert execution["messages"][0]["content"][-1]["text"] == released.format(
        prompt="Make the square red (score=4).", requirement=""
    )
    released = ReleasedPrompts(PromptSource(str(FIXTURE), tmp_path, allow_drift=True))
    judges = training_judges("firm", ["edit_execution", "edit_consistency"], released)
    check_records(records, judges, "firm")
    with pytest.raises(ValueError, match="not rendered with the 'own' prompts"):
        check_records(records, training_judges("own", list(judges), released), "own")


def test_every_pipeline_curates_records_of_its_own_tasks_judges() -> None:
    from server.tasks import SERVER_TASKS

    curated = {task: kind.judges for task, kind in PIPELINES.items()}
    assert curated == {"edit": ("edit_execution", "edit_consistency"), "gen": ("gen_instruction_following",)}
    for task, kind in PIPELINES.items():
        assert set(kind.judges) <= set(SERVER_TASKS[task].judges), task  # type: ignore[index]
        assert set(kind.required) <= set(kind.fields), task
