from __future__ import annotations

import string
from pathlib import Path

import pytest
from PIL import Image

from server.engines.base import GenerationResult, WatchedStep
from server.judges import JUDGES, ParseError, TemplateError, edit_fields, expected_score, gen_fields, load_judges


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_the_packaged_templates_have_the_released_fields() -> None:
    judges = load_judges()
    assert set(judges) == set(JUDGES)
    assert _fields(judges["edit_execution"].text) == {"prompt"}
    assert _fields(judges["edit_consistency"].text) == {"prompt"}
    assert _fields(judges["gen_instruction_following"].text) == {"prompt", "requirement"}
    # the quality prompt has no fields and is sent as written, so its JSON braces stay single
    assert judges["gen_quality"].render() == judges["gen_quality"].text
    assert '"score" : [' in judges["gen_quality"].text


def test_the_release_budgets_are_the_defaults() -> None:
    budgets = {name: judge.max_new_tokens for name, judge in load_judges().items()}
    assert budgets == {
        "edit_execution": 256,
        "edit_consistency": 256,
        "gen_instruction_following": 8192,
        "gen_quality": 8192,
    }


def test_edit_prompt_puts_source_then_edited_image_then_text() -> None:
    source, edited = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 0, 0))
    parts = load_judges()["edit_consistency"].prompt((source, edited), **edit_fields("Add a hat."))
    assert parts[0] is source and parts[1] is edited
    assert isinstance(parts[2], str) and "Instruction: Add a hat." in parts[2]
    assert '{\n"reasoning" : "' in parts[2]  # doubled braces render as the answer's JSON braces


def test_a_missing_requirement_renders_as_an_empty_string() -> None:
    judge = load_judges()["gen_instruction_following"]
    assert judge.render(**gen_fields("a red car", None)) == judge.text.format(prompt="a red car", requirement="")
    assert judge.render(**gen_fields("a red car", "no people")).endswith(
        "a red car\n### Additional Requirement (if any)\nno people\n"
    )


def test_a_user_template_replaces_the_packaged_one(tmp_path: Path) -> None:
    path = tmp_path / "exec.txt"
    path.write_text('Judge this edit: {prompt}. Answer {{"score": [N]}}')
    judges = load_judges({"edit_execution": path})
    parts = judges["edit_execution"].prompt((), **edit_fields("remove the car"))
    assert parts == ('Judge this edit: remove the car. Answer {"score": [N]}',)
    assert judges["edit_consistency"].text != path.read_text()
    assert judges["edit_execution"].origin == str(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("No field at all", "missing ['{prompt}']"),
        ("{prompt} and {colour}", "unknown ['{colour}']"),
        ('{prompt} answers {"score": 1}', "literal braces"),
    ],
)
def test_a_user_template_with_wrong_fields_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TemplateError, match=problem.replace("[", r"\[").replace("{", r"\{")):
        load_judges({"edit_execution": path})


def test_a_requirement_field_is_required_of_the_instruction_following_template(tmp_path: Path) -> None:
    path = tmp_path / "if.txt"
    path.write_text("Does the image show {prompt}?")
    with pytest.raises(TemplateError, match=r"missing \['\{requirement\}'\]"):
        load_judges({"gen_instruction_following": path})


def test_expected_score_is_renormalised_over_the_score_tokens() -> None:
    assert expected_score({"1": 0.1, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.1}) == pytest.approx(3.0)
    assert expected_score({"5": 0.8, "4": 0.2}) == pytest.approx(4.8)
    assert expected_score({"1": 0.0}) is None


def test_judge_takes_the_probabilities_at_the_score_position() -> None:
    text = '{\n"reasoning" : "1 of 2 hats",\n"score" : [4]\n}'
    offset = text.index("[4]") + 1
    steps = (
        WatchedStep(offset=text.index("1 of"), token="1", probs={"1": 0.9, "5": 0.1}),
        WatchedStep(offset=offset, token="4", probs={"3": 0.25, "4": 0.75}),
    )
    outcome = load_judges()["edit_execution"].judge(GenerationResult(text=text, watched=steps))
    assert outcome.scores == {"score": 4}
    assert outcome.expected["score"] == pytest.approx(3.75)
    assert outcome.reasoning == "1 of 2 hats"


def test_quality_expected_values_are_read_per_subscore() -> None:
    text = '{\n  "score" : [4, 3, 5],\n  "reasoning" : "ok"\n}'
    steps = tuple(
        WatchedStep(offset=text.index(digit), token=digit, probs=probs)
        for digit, probs in (("4", {"4": 0.5, "1": 0.5}), ("3", {"3": 0.5, "1": 0.5}), ("5", {"5": 1.0}))
    )
    outcome = load_judges()["gen_quality"].judge(GenerationResult(text=text, watched=steps))
    assert outcome.scores == {"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}
    assert outcome.expected == {"aesthetics": 2.5, "technical_quality": 2.0, "structure_texture": 5.0}


def test_judge_without_probabilities_still_scores() -> None:
    text = "**Final Analysis**:\nFine.\n\n**Final Alignment Rating: 3**\n\\boxed{3}"
    outcome = load_judges()["gen_instruction_following"].judge(GenerationResult(text=text))
    assert outcome.scores == {"score": 3} and outcome.expected == {"score": None}


def test_judge_raises_on_an_unparsable_answer() -> None:
    with pytest.raises(ParseError):
        load_judges()["gen_quality"].judge(GenerationResult(text='{"aesthetics": 9}'))
