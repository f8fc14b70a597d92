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
from clients.adapters.failures import RewardsUnavailable, check_on_failure, fill_failures
from clients.adapters.flow_grpo import edit_reward_fn, gen_reward_fn, multi_score
from clients.adapters.inputs import INPUTS, TaskInputs
from clients.adapters.trl import firm_reward
from clients.adapters.verl import make_compute_score
from clients.tasks import TASKS
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


def test_flow_grpo_generation_reward_returns_tensorable_columns(client: RewardClient) -> None:
    reward_fn = gen_reward_fn(client)
    rewards, extra = reward_fn(
        _nchw("red", "blue"), ["a red square"] * 2, [{}, {"requirement": "none"}], only_strict=True
    )
    assert extra == {"errors": []}
    assert set(rewards) == {"avg", "firm_gen", "instruction_following", "quality", "failed"}
    for value in rewards.values():
        assert value.shape == (2,) and value.dtype == np.float64
        assert torch.as_tensor(value).float().shape == (2,)
    assert rewards["avg"][0] > rewards["avg"][1] == 0.0
    assert rewards["instruction_following"].tolist() == [1.0, 0.0]
    assert rewards["failed"].tolist() == [0.0, 0.0]


def test_flow_grpo_edit_sources_from_ref_images_or_metadata(client: RewardClient, tmp_path: Path) -> None:
    picture("blue").save(tmp_path / "source.png")
    edited = _nchw("red", "blue")
    from_refs, _ = edit_reward_fn(client)(edited, [INSTRUCTION] * 2, [{}, {}], [picture("blue")] * 2)
    from_paths, _ = edit_reward_fn(client, source_key="image", source_root=tmp_path)(
        edited, [INSTRUCTION] * 2, [{"image": "source.png"}] * 2
    )
    assert from_refs["avg"].tolist() == pytest.approx([0.9, 0.0]) == from_paths["avg"].tolist()
    with pytest.raises(KeyError, match="ref_images"):
        edit_reward_fn(client)(edited, [INSTRUCTION] * 2, [{}, {}])


@pytest.mark.parametrize(
    ("on_failure", "expected"), [("group_mean", [0.9, 0.9, 0.0, 0.6]), (0.25, [0.9, 0.9, 0.0, 0.25])]
)
def test_flow_grpo_failed_item_follows_on_failure(client: RewardClient, on_failure: object, expected: list) -> None:
    edited = [picture("red"), picture("red"), picture("blue"), _broken_png()]
    reward_fn = edit_reward_fn(client, on_failure=on_failure)
    rewards, extra = reward_fn(edited, [INSTRUCTION] * 4, None, [picture("blue")] * 4)
    assert rewards["avg"].tolist() == pytest.approx(expected)
    assert rewards["failed"].tolist() == [0.0, 0.0, 0.0, 1.0]
    ((index, reason),) = extra["errors"]  # the call's own failures, in the release's metadata slot
    assert index == 3 and reason.startswith("invalid_image")
    assert not hasattr(reward_fn, "last_errors")  # nothing of a call is kept on the shared function


def test_flow_grpo_nan_setting_and_an_all_failed_call(client: RewardClient) -> None:
    broken = [_broken_png(), _broken_png()]
    rewards, _ = edit_reward_fn(client, on_failure="nan")(broken, [INSTRUCTION] * 2, None, [picture("blue")] * 2)
    assert np.isnan(rewards["avg"]).all() and rewards["failed"].tolist() == [1.0, 1.0]
    with pytest.raises(RewardsUnavailable, match="invalid_image"):
        edit_reward_fn(client)(broken, [INSTRUCTION] * 2, None, [picture("blue")] * 2)


def test_fill_failures_groups_and_settings() -> None:
    values = [0.2, math.nan, 0.6, math.nan, math.nan, 1.0]
    groups = ["a", "a", "a", "b", "b", "c"]
    assert fill_failures(values, groups, "group_mean").tolist() == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6, 1.0])
    assert fill_failures(values, groups, -1.0).tolist() == [0.2, -1.0, 0.6, -1.0, -1.0, 1.0]
    assert np.isnan(fill_failures(values, groups, "nan")[1])
    for bad in ("zero", math.nan, True):
        with pytest.raises(ValueError, match="on_failure"):
            check_on_failure(bad)  # type: ignore[arg-type]


def test_every_task_has_one_inputs_entry_naming_its_wire_fields() -> None:
    assert set(INPUTS) == set(TASKS)
    assert INPUTS["edit"].keys == ("edited", "instruction", "source")
    assert INPUTS["gen"].keys == ("image", "prompt", "requirement")
    assert INPUTS["edit"].terms == ("firm_edit", "execution", "consistency")
    with pytest.raises(ValueError, match=r"\['edited'\] are not fields of its wire item"):
        TaskInputs(TASKS["gen"], image="edited", text="prompt", source=None, requirement=None, score=print)
    with pytest.raises(ValueError, match="task must be one of 'edit', 'gen', got 't2i'"):
        firm_reward(object(), "t2i")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task must be one of"):
        make_compute_score(object(), "video")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown gen terms"):
        gen_reward_fn(object(), weights={"execution": 1.0})  # type: ignore[arg-type]


def test_multi_score_terms_and_release_options(client: RewardClient) -> None:
    reward_fn = multi_score("cuda:0", {"execution": 0.5, "consistency": 0.5}, client=client, use_total_score=True)
    rewards, _ = reward_fn(_nchw("red"), [INSTRUCTION], [{}], [picture("blue")], only_strict=False)
    assert rewards["avg"][0] == pytest.approx(0.5 * rewards["execution"][0] + 0.5 * rewards["consistency"][0])
    with pytest.raises(ValueError, match="names no FIRM term"):
        multi_score("cpu", {"pickscore": 1.0}, client=client)
    with pytest.raises(ValueError, match="unknown edit terms"):
        multi_score("cpu", {"firm_edit": 1.0, "bogus": 1.0}, client=client)


def _trl_call(reward: object, prompts: list, completions: list, **columns: object) -> list:
    """The keyword call GRPOTrainer._calculate_rewards makes (trl 1.16): prompts, completions, completion_ids,
    every other dataset column, trainer_state, log_extra and log_metric."""
    logged: dict[str, float] = {}
    values = reward(  # type: ignore[operator]
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * len(prompts),
        trainer_state=None,
        log_extra=lambda column, values: None,
        log_metric=logged.__setitem__,
        **columns,
    )
    return [values, logged]


def test_trl_reward_from_a_generated_images_column(client: RewardClient) -> None:
    reward = firm_reward(client, "gen")
    assert reward.__name__ == "firm_gen"
    prompts = ["a red square", [{"role": "user", "content": [{"type": "text", "text": "a red square"}]}]]
    values, logged = _trl_call(reward, prompts, ["", ""], generated_images=[[picture("red")], [_broken_png()]])
    assert values[0] is not None and values[0] > 0 and values[1] is None
    assert logged == {"firm_gen/failed_fraction": 0.5}
    filled, _ = _trl_call(
        firm_reward(client, "gen", on_failure="group_mean"),
        ["a red square"] * 3,
        ["", "", ""],
        generated_images=[picture("red"), picture("blue"), _broken_png()],
    )
    assert filled[2] == pytest.approx((filled[0] + filled[1]) / 2)
    edit, _ = _trl_call(
        firm_reward(client, "edit", render=lambda prompts, completions: [picture("blue")]),
        [INSTRUCTION],
        ["keep it"],
        source=[picture("blue")],
    )
    assert edit == [0.0]
    with pytest.raises(ValueError, match="input images"):
        firm_reward(client, "gen", images_column="images")


def test_verl_batch_form_keys_and_values(
    client: RewardClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "red.png"
    picture("red").save(path)
    compute_score = make_compute_score(client, "gen", on_failure="nan")
    single = compute_score(
        data_source="firm",
        solution_str="",
        ground_truth=None,
        extra_info={"image": str(path), "prompt": "a red square"},
    )
    assert single["failed"] == 0.0 and single["score"] > 0 and single["score"] == single["firm_gen"]
    batch = compute_score(
        data_sources=["firm"] * 2,
        solution_strs=["", ""],
        ground_truths=[None, None],
        extra_infos=[{"image": str(path), "prompt": "a red square"}, {"image": _broken_png(), "prompt": "x"}],
    )
    assert batch[0] == single and set(batch[1]) == set(single)
    assert math.isnan(batch[1]["score"]) and batch[1]["failed"] == 1.0
    assert any("1 of 2 items were not scored (invalid_image" in r.getMessage() for r in caplog.records)


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


def test_cli_scores_one_item_of_each_task(server_url: str, tmp_path: Path) -> None:
    """`firm-score edit` and `firm-score gen`: one subcommand per task, its item's fields as flags."""
    picture("blue").save(tmp_path / "blue.png")
    picture("red").save(tmp_path / "red.png")
    edit = _firm_score(
        "edit", "--source", str(tmp_path / "blue.png"), "--edited", str(tmp_path / "red.png"),
        "--instruction", INSTRUCTION, "--url", server_url,
    )  # fmt: skip
    gen = _firm_score(
        "gen", "--image", str(tmp_path / "red.png"), "--prompt", "a red square", "--requirement", "no text",
        "--url", server_url,
    )  # fmt: skip
    assert edit.returncode == 0, edit.stderr
    assert set(json.loads(edit.stdout)) >= {"id", "execution", "consistency", "reward"}
    assert gen.returncode == 0, gen.stderr
    assert set(json.loads(gen.stdout)) >= {"id", "instruction_following", "quality", "reward"}
    assert "1 items: 1 scored" in gen.stderr
