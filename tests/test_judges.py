from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from server.engines.base import GenerationResult, WatchedStep
from server.judges import JUDGES, ParseError, TemplateError, expected_score, load_judges


def test_every_judge_has_a_packaged_template_with_its_placeholders() -> None:
    judges = load_judges()
    assert set(judges) == set(JUDGES)
    assert set(judges["edit_execution"].template.get_identifiers()) == {"instruction"}
    assert set(judges["gen_instruction_following"].template.get_identifiers()) == {"prompt", "requirement"}
    assert judges["gen_quality"].template.get_identifiers() == []


def test_edit_prompt_puts_source_then_edited_image_then_text() -> None:
    source, edited = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 0, 0))
    parts = load_judges()["edit_consistency"].prompt((source, edited), instruction="Add a hat.")
    assert parts[0] is source and parts[1] is edited
    assert isinstance(parts[2], str) and "Editing instruction: Add a hat." in parts[2]
    assert '{"reasoning"' in parts[2]  # JSON braces survive templating


def test_a_user_template_replaces_the_packaged_one(tmp_path: Path) -> None:
    path = tmp_path / "exec.txt"
    path.write_text('Judge this edit: $instruction. Answer {"score": [N]}')
    judges = load_judges({"edit_execution": path})
    parts = judges["edit_execution"].prompt((), instruction="remove the car")
    assert parts == ('Judge this edit: remove the car. Answer {"score": [N]}',)
    assert judges["edit_consistency"].template.template != path.read_text()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("No placeholder at all", "missing ['$instruction']"), ("$instruction and $prompt", "unknown ['$prompt']")],
)
def test_a_user_template_with_wrong_placeholders_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TemplateError, match=problem.replace("[", r"\[").replace("$", r"\$")):
        load_judges({"edit_execution": path})


def test_expected_score_is_renormalised_over_the_score_tokens() -> None:
    assert expected_score({"1": 0.1, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.1}) == pytest.approx(3.0)
    assert expected_score({"5": 0.8, "4": 0.2}) == pytest.approx(4.8)
    assert expected_score({"1": 0.0}) is None


def test_judge_takes_the_probabilities_at_the_score_position() -> None:
    text = '{"reasoning": "1 of 2 hats", "score": [4]}'
    offset = text.index("[4]") + 1
    steps = (
        WatchedStep(offset=text.index("1 of"), token="1", probs={"1": 0.9, "5": 0.1}),
        WatchedStep(offset=offset, token="4", probs={"3": 0.25, "4": 0.75}),
    )
    outcome = load_judges()["edit_execution"].judge(GenerationResult(text=text, watched=steps))
    assert outcome.scores == {"score": 4}
    assert outcome.expected["score"] == pytest.approx(3.75)
    assert outcome.reasoning == "1 of 2 hats"


def test_judge_without_probabilities_still_scores() -> None:
    outcome = load_judges()["gen_instruction_following"].judge(GenerationResult(text="ok \\boxed{3}"))
    assert outcome.scores == {"score": 3} and outcome.expected == {"score": None}


def test_judge_raises_on_an_unparsable_answer() -> None:
    with pytest.raises(ParseError):
        load_judges()["gen_quality"].judge(GenerationResult(text='{"aesthetics": 9}'))
