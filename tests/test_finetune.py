"""`firm-train` on the tiny Qwen3-VL on CPU: the loss goes down and firm-serve serves the result."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path

import httpx
import pytest

from clients.protocol import EditScoreResponse
from server.cli import load_settings
from server.judges import load_judges
from server.judges.answers import json_score_answer
from server.prompts.sets import RECORD_FILE, chosen_set
from tests.support import b64, picture, running_server
from training.finetune import build_parser, load_base, run
from training.prompt_set import check_records, record_prompt_set, training_judges
from training.records import make_record, read_records, relative_path
from training.sft_data import Collator, load_examples

# a wording the tiny critic has not been taught (made of words its tokenizer knows), in the released format
DONE = "The edited square is red, as the instruction asks."
UNDONE = "The edited image is the same as the original."


def edit_records(folder: Path, count: int) -> Path:
    """Records as firm-curate writes them: coloured squares, the judges' prompts, answers in their format."""
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        source, target = rng.choice(["blue", "green", "purple"]), rng.choice(["red", "orange", "yellow"])
        done = i % 2 == 0
        paths = [folder / "images" / f"{i}-source.png", folder / "images" / f"{i}-edited.png"]
        picture(source).save(paths[0])
        picture(target if done else source).save(paths[1])
        images = [relative_path(p, folder) for p in paths]
        fields = {"instruction": f"Make the square {target}."}
        for judge, score in (("edit_execution", 5 if done else 1), ("edit_consistency", 4 if done else 5)):
            answer = json_score_answer(DONE if done else UNDONE, score)
            lines.append(make_record(f"item{i}", judge, images, fields, answer))
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def long_answer_record(folder: Path) -> Path:
    """One record whose answer is over the 256 tokens the served critic may write."""
    images = [relative_path(folder / "images" / f"0-{name}.png", folder) for name in ("source", "edited")]
    answer = json_score_answer(" ".join([DONE] * 40), 5)
    record = make_record("long", "edit_execution", images, {"instruction": "Make the square red."}, answer)
    path = folder / "long.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("finetune")
    base = shutil.copytree(tiny_checkpoint, work / "base")
    records = edit_records(work / "data", 8)
    output = work / "critic"
    args = [str(records), str(long_answer_record(work / "data"))]
    args += ["--base-model", str(base), "--output", str(output), "--device", "cpu"]
    args += ["--learning-rate", "2e-3", "--max-steps", "20", "--batch-size", "4", "--grad-accum", "1"]
    args += ["--logging-steps", "1", "--measure-examples", "8"]
    return output, run(args)


def test_answer_only_labels_end_with_the_end_of_turn_token(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    examples = load_examples([edit_records(tmp_path, 1)])
    batch = Collator(processor, 64 * 64)(examples)
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert processor.tokenizer.decode(labelled) == example.answer + "<|im_end|>"


def test_a_record_whose_answer_the_served_critic_could_not_finish_is_left_out(trained: tuple[Path, dict]) -> None:
    _, report = trained
    assert report["examples"] == 16
    assert report["left_out"] == {"answer_over_max_tokens": ["long/edit_execution"]}


def test_the_prompt_set_is_recorded_next_to_the_weights_and_served_with_them(trained: tuple[Path, dict]) -> None:
    output, _ = trained
    recorded = json.loads((output / RECORD_FILE).read_text())
    own = load_judges()
    assert recorded["prompts"] == "own"
    assert recorded["judges"]["edit_execution"]["sha256"] == own["edit_execution"].sha256
    assert chosen_set("auto", str(output)) == "own"


def test_records_rendered_with_other_prompts_are_refused(tmp_path: Path) -> None:
    records = list(read_records(edit_records(tmp_path / "data", 2)))
    judges = load_judges()
    check_records(records, judges, "own")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "edit_execution.txt").write_text("Was this done: {prompt}?")

    def no_release(names: object) -> dict:
        raise AssertionError("the release's prompts were fetched for a set of one's own")

    other = training_judges(str(mine), ["edit_execution", "edit_consistency"], no_release)
    with pytest.raises(ValueError, match=r"2 records were not rendered with the .* prompts \(item0/edit_execution"):
        check_records(records, other, str(mine))
    record_prompt_set(tmp_path / "critic", str(mine), other)
    assert (tmp_path / "critic" / "prompts" / "edit_execution.txt").read_text() == "Was this done: {prompt}?"
    assert json.loads((tmp_path / "critic" / RECORD_FILE).read_text())["prompts"] == "prompts"
    assert chosen_set("auto", str(tmp_path / "critic")) == str(tmp_path / "critic" / "prompts")


def test_training_lowers_the_loss_and_writes_a_model_card(trained: tuple[Path, dict]) -> None:
    output, report = trained
    loss = report["loss"]
    assert loss["after"] < 0.7 * loss["before"], loss
    assert [entry["step"] for entry in loss["logged"]][-1] == 20
    card = (output / "README.md").read_text()
    assert "base_model:" in card
    # each serve command loads the trained critic for one task and no default critic for the other
    commands = [line.split("#")[0] for line in card.splitlines() if line.startswith("firm-serve ")]
    served = []
    for command in commands:
        settings = load_settings(shlex.split(command)[1:])
        served.append((settings.edit_model, settings.gen_model))
    assert served == [(str(output), "none"), ("none", str(output))]
    assert json.loads((output / "firm_training.json").read_text())["settings"]["learning_rate"] == 2e-3
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja"):
        assert (output / name).exists(), name


def test_firm_serve_serves_the_trained_critic_unchanged(trained: tuple[Path, dict], tmp_path: Path) -> None:
    output, _ = trained
    args = ["--edit-model", str(output), "--gen-model", "none", "--engine", "transformers", "--device", "cpu"]
    with running_server(tmp_path, *args, tiny=False) as url:
        body = {
            "items": [{"id": "a", "source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}]
        }
        body["return_reasoning"] = True
        reply = EditScoreResponse.model_validate(httpx.post(f"{url}/v1/edit/score", json=body, timeout=120).json())
    (result,) = reply.results
    assert result.error is None, result.error
    assert reply.model.name == str(output)
    assert result.execution is not None and result.execution.score in range(1, 6)
    # the served weights are the trained ones: the answer is no longer the base critic's
    assert result.execution.reasoning not in (None, "The square is now red; the rest is kept.")


def test_the_seed_decides_the_initial_lora_weights(tiny_checkpoint: Path) -> None:
    import torch

    def lora_weights(seed: int, noise: int) -> list[torch.Tensor]:
        torch.manual_seed(noise)  # whatever ran before must not matter
        args = build_parser().parse_args(["r.jsonl", "--base-model", str(tiny_checkpoint), "--output", "unused"])
        args.lora, args.seed, args.device, args.lora_targets = True, seed, "cpu", "q_proj"
        loaded = load_base(args, processor=None)
        return [p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_A" in n]

    first, again, other = lora_weights(1, noise=10), lora_weights(1, noise=20), lora_weights(2, noise=10)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_lora_training_is_merged_into_a_plain_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    records = edit_records(tmp_path / "data", 4)
    output = tmp_path / "lora-critic"
    args = [str(records), "--base-model", str(tiny_checkpoint), "--output", str(output), "--device", "cpu", "--lora"]
    args += ["--lora-targets", "q_proj,v_proj", "--learning-rate", "1e-2", "--max-steps", "3", "--batch-size", "4"]
    report = run([*args, "--grad-accum", "1", "--measure-examples", "4"])
    assert report["method"] == "lora (merged)"
    assert report["loss"]["after"] < report["loss"]["before"]
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert not [name for name in model.state_dict() if "lora" in name]
