from __future__ import annotations

import pytest

from server.judges.parsing import ParseError, parse_boxed_score, parse_json_score, parse_quality_scores

JSON_ANSWERS = [
    ('{"reasoning": "The hat is red now.", "score": [4]}', 4, "The hat is red now."),
    ('```json\n{"reasoning": "Done well.", "score": [5]}\n```', 5, "Done well."),
    ('Here is my verdict:\n{"reasoning": "Partly done.", "score": 3}\nThanks.', 3, "Partly done."),
    ('{"reasoning": "x", "score": "2"}', 2, "x"),
    ('{"reasoning": "x", "score": ["1"]}', 1, "x"),
    ('{ "score" : [ 4 ] , "reasoning":"late reasoning"}', 4, "late reasoning"),
    ("{'reasoning': 'single quotes', 'score': [3]}", 3, None),
    ('{"reasoning": "says \\"score: 1\\" inside", "score": [5]}', 5, 'says "score: 1" inside'),
    ("4", 4, None),
    ("  [2]\n", 2, None),
    ('{"reasoning": "whole number", "score": [4.0]}', 4, "whole number"),
    ('{"reasoning": "multi\\nline", "score": [3]}', 3, "multi\nline"),
]


@pytest.mark.parametrize(("text", "score", "reasoning"), JSON_ANSWERS)
def test_json_answers_that_hold_a_score(text: str, score: int, reasoning: str | None) -> None:
    parsed = parse_json_score(text)
    assert parsed.scores["score"].value == score
    assert parsed.reasoning == reasoning
    # the offset points at the digit, so the score token's probabilities can be found
    assert text[parsed.scores["score"].offset] == str(score)


@pytest.mark.parametrize(
    "text",
    [
        '{"reasoning": "too high", "score": [6]}',
        '{"reasoning": "zero", "score": [0]}',
        '{"reasoning": "negative", "score": -1}',
        '{"reasoning": "half", "score": [3.5]}',
        '{"reasoning": "no score here"}',
        "",
        "I cannot judge this image.",
        '{"reasoning": "ten", "score": [10]}',
    ],
)
def test_json_answers_without_a_valid_score_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_json_score(text)


BOXED_ANSWERS = [
    ("1. A cat: yes. 2. Red hat: yes.\nRating: \\boxed{5}", 5),
    ("The dog is missing. \\boxed{ 2 }", 2),
    ("First guess \\boxed{3}, on reflection \\boxed{4}", 4),
    ("Analysis... \\boxed{4}.", 4),
    ("\\boxed{1}", 1),
]


@pytest.mark.parametrize(("text", "score"), BOXED_ANSWERS)
def test_boxed_answers(text: str, score: int) -> None:
    parsed = parse_boxed_score(text)
    assert parsed.scores["score"].value == score
    assert text[parsed.scores["score"].offset] == str(score)


def test_boxed_reasoning_is_the_analysis_before_the_box() -> None:
    assert parse_boxed_score("Cat present. \\boxed{5}").reasoning == "Cat present."


@pytest.mark.parametrize(
    "text", ["Rating: 5", "\\boxed{6}", "\\boxed{0}", "\\boxed{}", "\\boxed{four}", "\\boxed{2.5}"]
)
def test_boxed_answers_without_a_valid_rating_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_boxed_score(text)


def test_quality_subscores() -> None:
    text = '```json\n{"aesthetics": 4, "technical_quality": "2", "structure_texture": [5]}\n```'
    parsed = parse_quality_scores(text)
    assert {k: m.value for k, m in parsed.scores.items()} == {
        "aesthetics": 4,
        "technical_quality": 2,
        "structure_texture": 5,
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"aesthetics": 4, "technical_quality": 3}',
        '{"aesthetics": 4, "technical_quality": 3, "structure_texture": 7}',
        '{"aesthetics": 0, "technical_quality": 3, "structure_texture": 3}',
        "looks good",
    ],
)
def test_quality_answers_missing_or_out_of_range_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_quality_scores(text)
