"""`firm-bench` on a small synthetic bench whose critic answers are known: the MAE is the hand-computed one.

The tiny critic writes execution 5 / consistency 4 for a done colour edit, 1 / 5 for an unchanged
image, and instruction following 5 when the square has the prompt's colour, 1 when not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clients import AsyncRewardClient
from clients.errors import ServerError, Unauthorized
from tests.support import free_port, picture
from training.bench.cli import run

# (id, source, edited, instruction, dimension, human) -> the tiny critic's score
EDITS = [
    ("p1", "blue", "red", "Make the square red.", "execution", 4),  # predicted 5: error 1
    ("p1", "blue", "red", "Make the square red.", "consistency", 4),  # predicted 4: error 0
    ("p2", "green", "green", "Make the square orange.", "execution", 2),  # predicted 1: error 1
    ("p2", "green", "green", "Make the square orange.", "consistency", 5),  # predicted 5: error 0
    ("p3", "purple", "yellow", "Paint the square yellow.", "execution", 5),  # predicted 5: error 0
    ("p4", "blue", None, "Make the square red.", "execution", 3),  # undecodable image: failed, not scored
]
# (id, shown colour, prompt, difficulty, human)
GENS = [
    ("g1", "red", "a red square", "easy", 5),  # predicted 5: error 0
    ("g2", "blue", "a red square", "easy", 2),  # predicted 1: error 1
    ("g3", "yellow", "a yellow square", "hard", 3),  # predicted 5: error 2
    ("g4", "green", "a orange square", "hard", 1),  # predicted 1: error 0
]
EXPECTED = {
    "edit": {"execution": 2 / 3, "consistency": 0.0, "overall": 2 / 5},
    "gen": {"easy": 0.5, "hard": 1.0, "overall": 0.75},
}


def matrix(*pairs: tuple[int, int]) -> list[list[int]]:
    """counts[human - 1][predicted - 1] of (human, predicted) pairs."""
    counts = [[0] * 5 for _ in range(5)]
    for human, predicted in pairs:
        counts[human - 1][predicted - 1] += 1
    return counts


# the (human, predicted) pairs above, per group; the failed item is in none
CONFUSION = {
    "edit": {"execution": matrix((4, 5), (2, 1), (5, 5)), "consistency": matrix((4, 4), (5, 5))},
    "gen": {"easy": matrix((5, 5), (2, 1)), "hard": matrix((3, 5), (1, 1))},
}


def make_bench(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    lines = []
    for item_id, source, edited, instruction, dimension, human in EDITS:
        picture(source).save(folder / "img" / f"{item_id}-a.png")
        if edited is None:
            (folder / "img" / f"{item_id}-b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        else:
            picture(edited).save(folder / "img" / f"{item_id}-b.png")
        lines.append(
            {
                "id": f"{item_id}-{dimension}",
                "src": f"img/{item_id}-a.png",
                "out": f"img/{item_id}-b.png",
                "instruction": instruction,
                "dimension": dimension,
                "human": human,
            }
        )
    (folder / "edit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    lines = []
    for item_id, shown, prompt, difficulty, human in GENS:
        picture(shown).save(folder / "img" / f"{item_id}.png")
        lines.append(
            {"id": item_id, "image": f"img/{item_id}.png", "prompt": prompt, "difficulty": difficulty, "mos": human}
        )
    (folder / "gen.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


FIELDS = ["--edit-field", "source=src", "--edit-field", "edited=out", "--gen-field", "human=mos"]


def test_bench_through_a_running_server_reproduces_the_hand_computed_mae(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = make_bench(tmp_path / "bench")
    output = tmp_path / "results"
    status = run([str(bench), "--url", server_url, "--output", str(output), "--label", "tiny critic", *FIELDS])
    assert status == 1  # one item failed, and the run says so

    results = json.loads((output / "results.json").read_text())
    for task, groups in EXPECTED.items():
        for group, value in groups.items():
            assert results["mae"][task][group]["mae"] == pytest.approx(value), (task, group)
    assert results["mae"]["edit"]["execution"] == {"mae": pytest.approx(2 / 3), "scored": 3, "failed": 1}
    failed = [item for item in results["items"] if item["error"]]
    assert [item["id"] for item in failed] == ["p4-execution"]
    assert failed[0]["predicted"] is None and failed[0]["error"].startswith("invalid_image")

    printed = capsys.readouterr().out
    assert printed == (output / "table.txt").read_text()
    lines = printed.splitlines()
    assert lines[1].split() == ["Model", "Execution", "Consistency", "Overall", "Easy", "Hard", "Overall"]
    assert lines[3].split() == ["GPT-5", "(paper)", "0.62", "0.73", "0.67", "-", "-", "0.52"]
    assert lines[4].split() == ["FIRM-8B", "(paper)", "0.53", "0.73", "0.62", "0.45", "0.57", "0.51"]
    assert lines[5].split() == ["tiny", "critic", "0.67", "0.00", "0.40", "0.50", "1.00", "0.75"]

    with Image.open(output / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 4 * png.height / 2
    assert results["confusion"] == CONFUSION
    assert results["confusion_panels"] == ["Edit: execution", "Edit: consistency", "Gen: easy", "Gen: hard"]


def test_bench_in_process_skips_the_task_whose_critic_is_switched_off(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = make_bench(tmp_path / "bench")  # editing and generation items, an editing critic only
    engine = f"--edit-model {tiny_checkpoint} --gen-model none --engine transformers --device cpu"
    output = tmp_path / "results"
    assert run([str(bench), "--engine-args", engine, "--output", str(output), *FIELDS]) == 1  # p4 failed
    results = json.loads((output / "results.json").read_text())
    assert {g: v["mae"] for g, v in results["mae"]["edit"].items()} == pytest.approx(EXPECTED["edit"])
    assert "gen" not in results["mae"] and results["label"] == str(tiny_checkpoint)
    assert list(results["skipped"]) == ["gen"] and "switched off" in results["skipped"]["gen"]
    assert results["confusion"] == {"edit": CONFUSION["edit"]}
    assert {item["task"] for item in results["items"]} == {"edit"}
    errors = capsys.readouterr().err
    assert "the gen items are skipped" in errors and "g1" not in errors


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (ServerError(500, "internal_error", "internal server error"), 1),  # that request's items fail
        (Unauthorized(401, "unauthorized", "unknown key"), 2),  # no later request can succeed
    ],
)
def test_a_refused_request_keeps_what_was_scored(
    server_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    refusal: ServerError,
    status: int,
) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise refusal

    monkeypatch.setattr(AsyncRewardClient, "score_generations", refuse)
    bench = make_bench(tmp_path / "bench")
    output = tmp_path / "results"
    assert run([str(bench), "--url", server_url, "--output", str(output), *FIELDS]) == status

    results = json.loads((output / "results.json").read_text())
    assert {g: v["mae"] for g, v in results["mae"]["edit"].items()} == pytest.approx(EXPECTED["edit"])
    assert results["mae"]["gen"]["overall"] == {"mae": None, "scored": 0, "failed": 4}
    gen_errors = {item["error"] for item in results["items"] if item["task"] == "gen"}
    errors = capsys.readouterr().err
    if status == 1:
        assert gen_errors == {"request_failed: HTTP 500 internal_error: internal server error"}
        assert results["aborted"] is None
    else:
        assert gen_errors == {"not_scored: the run stopped: HTTP 401 unauthorized: unknown key"}
        assert "stopped early: HTTP 401 unauthorized: unknown key" in errors


def test_no_server_stops_the_run_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = make_bench(tmp_path / "bench")
    output = tmp_path / "results"
    url = f"http://127.0.0.1:{free_port()}"
    assert run([str(bench), "--url", url, "--output", str(output), "--timeout-s", "5", *FIELDS]) == 2
    errors = capsys.readouterr().err
    assert errors.startswith("firm-bench: ") and url in errors and "Traceback" not in errors
    assert not (output / "results.json").exists()


def test_each_split_compares_a_dimension_of_its_tasks_results() -> None:
    from clients.tasks import TASKS
    from training.bench.splits import SPLITS

    compared = {split.task: split.rated or tuple(split.groups) for split in SPLITS}
    assert compared == {"edit": ("execution", "consistency"), "gen": "instruction_following"}
    for split in SPLITS:
        rated = [split.rated] if split.rated else list(split.groups)
        assert set(rated) <= set(TASKS[split.task].dimensions), split.task
