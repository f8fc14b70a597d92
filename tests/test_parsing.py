"""The parsers on answers in every format the released critics write, and the release's fallbacks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.judges.parsing import (
    ParsedAnswer,
    ParseError,
    parse_alignment_rating,
    parse_json_score,
    parse_quality_scores,
)

# The edit judges: {"reasoning" : "...", "score" : [N]}, as written, fenced, cut off, or with a bare score.
JSON_ANSWERS = [
    ('{\n"reasoning" : "The hat is red now.",\n"score" : [4]\n}', 4, "The hat is red now."),
    ('```json\n{\n"reasoning" : "Done well.",\n"score" : [5]\n}\n```', 5, "Done well."),
    ('Here is my verdict:\n{"reasoning": "Partly done.", "score": 3}\nThanks.', 3, "Partly done."),
    ('{"reasoning": "x", "score": "2"}', 2, "x"),
    ('{"reasoning": "x", "score": ["1"]}', 1, "x"),
    ('{ "score" : [ 4 ] , "reasoning":"late reasoning"}', 4, "late reasoning"),
    ('{"reasoning": "says \\"score\\": [1] inside", "score": [5]}', 5, 'says "score": [1] inside'),
    ('{"reasoning": "whole number", "score": [4.0]}', 4, "whole number"),
    ('{"reasoning": "multi\\nline", "score": [3]}', 3, "multi\nline"),
    # cut off after the score: the release reads it with its fallback pattern, and so do we
    ('{\n"reasoning" : "The sky is orange",\n"score" : [2', 2, "The sky is orange"),
]


@pytest.mark.parametrize(("text", "score", "reasoning"), JSON_ANSWERS)
def test_edit_answers_that_hold_a_score(text: str, score: int, reasoning: str | None) -> None:
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
        '{"reasoning": "cut before the score", "sco',
        "",
        "I cannot judge this image.",
        '{"reasoning": "ten", "score": [10]}',
        '{"reasoning": "ten, cut off", "score": [10',
    ],
)
def test_edit_answers_without_a_valid_score_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_json_score(text)


def _alignment(rating: str, box: str) -> str:
    return (
        "Let's evaluate the image against the Original Prompt:\n\n"
        "1. **Identified Requirement 1: a cat**:\n- A cat is present.\n\n"
        "**Final Analysis**:\nThe cat is there but the hat is blue.\n\n"
        f"**Final Alignment Rating: {rating}**\n{box}"
    )


# (answer, score, the text at the offset whose probabilities give the expected score)
ALIGNMENT_ANSWERS = [
    (_alignment("4", "\\boxed{4}"), 4, "4**"),
    (_alignment("3", "\\boxed{[3]}"), 3, "3**"),
    (_alignment("2", "\\boxed{{2}}"), 2, "2**"),
    (_alignment("[5]", "\\boxed{{[5]}}"), 5, "5]**"),
    (_alignment("4", ""), 4, "4**"),  # cut off after the rating line
    ("The dog is missing. \\boxed{ 2 }", 2, "2 }"),
    ('{"reasoning": "Only the cat.", "score": [3]}', 3, "3]"),
    ("Everything matches.\nFinal Score: [5]", 5, "5]"),
    ("Final Score: 1", 1, "1"),
]


@pytest.mark.parametrize(("text", "score", "at"), ALIGNMENT_ANSWERS)
def test_instruction_following_answers_in_the_released_formats(text: str, score: int, at: str) -> None:
    parsed = parse_alignment_rating(text)
    match = parsed.scores["score"]
    assert match.value == score
    assert match.offset is not None and text[match.offset :].startswith(at)


def test_expected_score_is_read_at_the_rating_line_not_the_box() -> None:
    text = _alignment("4", "\\boxed{4}")
    assert parse_alignment_rating(text).scores["score"].offset == text.index("Rating: 4") + len("Rating: ")


def test_the_box_wins_over_the_rating_line_as_in_the_release() -> None:
    text = _alignment("2", "\\boxed{5}")
    parsed = parse_alignment_rating(text).scores["score"]
    assert parsed.value == 5
    # a rating line that disagrees with the box does not lend its probabilities to the box's score
    assert text[parsed.offset - len("\\boxed{") : parsed.offset + 1] == "\\boxed{5"


def test_instruction_following_reasoning_is_the_final_analysis_paragraph() -> None:
    assert parse_alignment_rating(_alignment("4", "\\boxed{4}")).reasoning == "The cat is there but the hat is blue."


def test_fallback_order_is_box_then_rating_then_json_then_final_score_then_a_loose_score() -> None:
    text = 'Final Score: 1\n{"score": [2]}\nFinal Alignment Rating: 3\n\\boxed{4}'
    assert parse_alignment_rating(text).scores["score"].value == 4
    assert parse_alignment_rating(text.replace("\\boxed{4}", "")).scores["score"].value == 3
    assert parse_alignment_rating('Final Score: 1\n{"score": [2]}').scores["score"].value == 2
    # an object cut off before its '}' is no JSON: Final Score comes before its loose "score"
    assert parse_alignment_rating('{"score": [2]\nFinal Score: 1').scores["score"].value == 1
    assert parse_alignment_rating('{"score": [2]\nno final score').scores["score"].value == 2


def test_a_rating_line_that_writes_another_number_does_not_lend_the_box_its_probabilities() -> None:
    text = "**Final Alignment Rating: 4.5**\n\\boxed{4}"
    match = parse_alignment_rating(text).scores["score"]
    assert match.value == 4 and match.offset == text.index("{4}") + 1


def test_a_repeated_score_key_is_read_at_its_last_value_as_json_reads_it() -> None:
    text = '{"score": [2], "reasoning": "second thoughts", "score": [4]}'
    match = parse_json_score(text).scores["score"]
    assert match.value == 4 and match.offset == text.rindex("4")


def test_a_score_outside_the_range_passes_to_the_next_form() -> None:
    # the object's 7 is passed over; the first "score": N in the answer is read, as the release reads it
    assert parse_json_score('Draft "score": 3\n{"reasoning": "ok", "score": 7}').scores["score"].value == 3
    with pytest.raises(ParseError, match="7 is not a score from 1 to 5"):
        parse_json_score('{"reasoning": "ok", "score": 7}')


@pytest.mark.parametrize(
    ("parse", "text", "refused"),
    [
        (parse_json_score, '{"reasoning": "half", "score": [3.5]}', "3.5 is not a whole score"),
        (parse_json_score, '{"reasoning": "cut", "score": [10', "10 is not a score from 1 to 5"),
        (parse_json_score, '{"reasoning": "yes", "score": true}', "true is not a score"),
        (parse_alignment_rating, "**Final Alignment Rating: 2.5**", "2.5 is not a whole score"),
        (parse_quality_scores, '{"score": [4, 3.5, 5]}', "technical_quality 3.5 is not a whole score"),
    ],
)
def test_a_refusal_names_what_it_refused(parse: Callable[[str], ParsedAnswer], text: str, refused: str) -> None:
    with pytest.raises(ParseError) as refusal:
        parse(text)
    assert str(refusal.value) == refused


@pytest.mark.parametrize(
    "text",
    [
        "Rating: 5",
        "\\boxed{6}",
        "\\boxed{0}",
        "\\boxed{}",
        "\\boxed{four}",
        "\\boxed{2.5}",
        "Final Alignment Rating: 4.5",
    ],
)
def test_instruction_following_answers_without_a_valid_rating_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_alignment_rating(text)


QUALITY_ANSWERS = [
    ('{\n  "score" : [4, 3, 5],\n  "reasoning" : "Sharp."\n}', (4, 3, 5), "Sharp."),
    ('```json\n{\n  "score" : [2, 2, 1],\n  "reasoning" : "Blurry."\n}\n```', (2, 2, 1), "Blurry."),
    ('{"score": ["4", "4", "3"], "reasoning": "ok"}', (4, 4, 3), "ok"),
    ('{"score": [4.0, 3, 5]}', (4, 3, 5), None),
    ("Scores: [3, 4, 2]", (3, 4, 2), None),  # the release's bare-list fallback
    ('{\n  "score" : [5, 4, 4],\n  "reasoning" : "cut off mid-sent', (5, 4, 4), None),
]


@pytest.mark.parametrize(("text", "scores", "reasoning"), QUALITY_ANSWERS)
def test_quality_answers_in_the_released_list_format(text: str, scores: tuple[int, ...], reasoning: str | None) -> None:
    parsed = parse_quality_scores(text)
    assert tuple(m.value for m in parsed.scores.values()) == scores
    assert list(parsed.scores) == ["aesthetics", "technical_quality", "structure_texture"]
    assert parsed.reasoning == reasoning


@pytest.mark.parametrize(
    "text",
    [
        '{\n  "score" : [4, 3, 5],\n  "reasoning" : "Sharp."\n}',
        '{"score": ["4", " 3", 5.0], "reasoning": "strings and a float"}',
        'Draft "score": [1, 1, 1] then {"score": [4, 3, 5]}',  # the object's list, not the draft's
    ],
)
def test_quality_offsets_point_at_each_subscore_digit(text: str) -> None:
    parsed = parse_quality_scores(text)
    offsets = [m.offset for m in parsed.scores.values()]
    assert None not in offsets and [text[o] for o in offsets] == ["4", "3", "5"]
    assert offsets[0] > text.find("{")


@pytest.mark.parametrize(
    "text",
    [
        '{"score": [4, 3]}',
        '{"score": [4, 3, 7]}',
        '{"score": [0, 3, 3]}',
        '{"score": [4.5, 3, 3]}',
        '{"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}',
        "looks good",
    ],
)
def test_quality_answers_missing_or_out_of_range_fail(text: str) -> None:
    with pytest.raises(ParseError):
        parse_quality_scores(text)
