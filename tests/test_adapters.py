"""Trainer adapters and the firm-score command against a live firm-serve on the tiny critic."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import RewardClient
from clients.adapters.flow_grpo import edit_reward_fn, gen_reward_fn
from clients.adapters.trl import firm_reward
from clients.adapters.verl import make_compute_score
from tests.support import picture

INSTRUCTION = "Make the square red."


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[RewardClient]:
    with RewardClient(server_url) as client:
        yield client


def _nchw(*colours: str) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(picture(c))).permute(2, 0, 1).float() / 255 for c in colours])


def _broken_png() -> bytes:
    buffer = io.BytesIO()
    picture("red").save(buffer, format="PNG")
    return buffer.getvalue()[:60]


def test_flow_grpo_generation_reward(client: RewardClient) -> None:
    rewards, info = gen_reward_fn(client)(_nchw("red", "blue"), ["a red square"] * 2, [{}, {"requirement": "none"}])
    assert rewards.shape == (2,) and rewards.dtype == np.float64
    assert rewards[0] > rewards[1] == 0.0
    assert info["mask"].tolist() == [True, True]
    assert info["instruction_following"].tolist() == [1.0, 0.0]
    assert 0.0 <= info["quality"].min() <= 1.0


def test_flow_grpo_edit_reward_marks_failures_nan(client: RewardClient) -> None:
    edited = [picture("red"), _broken_png()]
    metadata = [{"source": picture("blue")}, {"source": picture("blue")}]
    rewards, info = edit_reward_fn(client)(edited, [INSTRUCTION] * 2, metadata)
    assert rewards[0] == pytest.approx(0.9) and math.isnan(rewards[1])
    assert info["mask"].tolist() == [True, False]
    assert info["errors"][0] is None and info["errors"][1].startswith("invalid_image")
    assert math.isnan(info["execution"][1])


def test_trl_reward_function_returns_none_for_failures(client: RewardClient) -> None:
    reward = firm_reward(client, "gen")
    assert reward.__name__ == "firm_gen"
    prompts = ["a red square", [{"role": "user", "content": [{"type": "text", "text": "a red square"}]}]]
    values = reward(prompts, ["", ""], images=[picture("red"), _broken_png()])
    assert values[0] is not None and values[0] > 0 and values[1] is None
    edit = firm_reward(client, "edit")([INSTRUCTION], [""], images=[picture("blue")], source=[picture("blue")])
    assert edit == [0.0]


def test_verl_compute_score_single_and_batched(client: RewardClient, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    picture("red").save(path)
    compute_score = make_compute_score(client, "gen")
    single = compute_score("firm", "", None, {"image": str(path), "prompt": "a red square"})
    assert single["valid"] == 1.0 and single["score"] > 0
    batch = compute_score(
        ["firm"] * 2,
        ["", ""],
        [None, None],
        [{"image": str(path), "prompt": "a red square"}, {"image": _broken_png(), "prompt": "x"}],
    )
    assert batch[0] == single
    assert math.isnan(batch[1]["score"]) and batch[1]["valid"] == 0.0 and "invalid_image" in batch[1]["error"]


def _manifest(tmp_path: Path, broken: bool) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    picture("blue").save(images / "source.png")
    picture("red").save(images / "done.png")
    (images / "broken.png").write_bytes(_broken_png())
    lines = [
        {"id": "done", "source": "images/source.png", "edited": "images/done.png", "instruction": INSTRUCTION},
        {"source": "images/source.png", "edited": "images/source.png", "instruction": INSTRUCTION},
    ]
    if broken:
        lines.append({"id": "bad", "source": "images/source.png", "edited": "images/broken.png", "instruction": "x"})
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _firm_score(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_scores_a_manifest_to_csv(server_url: str, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, broken=False)
    out = tmp_path / "scores.csv"
    result = _firm_score("manifest", str(manifest), "--task", "edit", "--output", str(out), "--url", server_url)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["done", "2"]  # missing ids are the line numbers
    assert [float(r["reward"]) for r in rows] == [pytest.approx(0.9), 0.0]
    assert "2 items: 2 scored, 0 failed" in result.stderr


def test_cli_exits_non_zero_when_an_item_fails(server_url: str, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, broken=True)
    result = _firm_score("manifest", str(manifest), "--task", "edit", "--url", server_url, "--no-progress")
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[2]["id"] == "bad" and rows[2]["reward"] is None and rows[2]["error_code"] == "invalid_image"
    assert "3 items: 2 scored, 1 failed" in result.stderr and "invalid_image: 1" in result.stderr


def test_cli_single_items_and_usage_errors(server_url: str, tmp_path: Path) -> None:
    picture("red").save(tmp_path / "red.png")
    result = _firm_score("gen", "--image", str(tmp_path / "red.png"), "--prompt", "a red square", "--url", server_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reward"] > 0
    missing = _firm_score("manifest", str(tmp_path / "nope.jsonl"), "--task", "gen", "--url", server_url)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "red.png"}\n')
    refused = _firm_score("manifest", str(bad), "--task", "gen", "--url", server_url)
    assert refused.returncode == 2 and "missing prompt" in refused.stderr
