"""Each answer scored as the public release (VisionXLab/FIRM-Reward at ba41493) scores it.

A row holds an answer and the release's outcome: its score, or 0 where the release fails the answer. The
server gives the same score where the release finds a whole score in range, and fails the item (ParseError)
where the release fails. Rows with `refused` are the documented exceptions: the release reads them only by
truncating a number (4.5 as 4, 10 as 1) or reading a JSON `true` as 1, and the server refuses them, naming
what it refused.

Each row's comment cites the release's line that decides it:
E:n is editing/reward_server/reward_server_qwen3_vl_8b.py (the _sft server it launches has the same lines),
G:n is generation/flow_grpo/reward_model_server.py. "Object" is the text from the first '{' to the last '}'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest

from server.judges.parsing import (
    ParsedAnswer,
    ParseError,
    parse_alignment_rating,
    parse_json_score,
    parse_quality_scores,
)


class Row(NamedTuple):
    answer: str
    release: int | tuple[int, int, int]  # 0: the release fails the answer
    refused: str | None = None  # what the server's refusal says, where it refuses what the release truncates


DEEP = '{"score": ' + "[" * 100_000 + "]" * 100_000 + "}"

EDIT = [
    Row('{"reasoning": "ok", "score": "4.0"}', 0),  # E:191 not all digits, E:200 reads no quoted digit
    Row('{"reasoning": "He said "wow" loudly", "score": "3"}', 0),  # E:195 not JSON, E:200 no quoted digit
    Row('{"reasoning": "ok", "score": [4]}', 4),  # E:187-188 first entry, E:193-194
    Row('```json\n{"reasoning": "ok", "score": [5]}\n```', 5),  # E:180-181 the fence is outside the object
    Row('{"reasoning": "ok", "score": 3}', 3),  # E:193-194
    Row('{"reasoning": "ok", "score": "2"}', 2),  # E:189-192
    Row('{"reasoning": "ok", "score": ["1"]}', 1),  # E:187-192
    Row('{"reasoning": "ok", "score": " 4 "}', 4),  # E:190 stripped
    Row('{"reasoning": "ok", "score": "04"}', 4),  # E:191-192
    Row('{"reasoning": "ok", "score": "\u0664"}', 4),  # E:191-192 a non-ASCII digit int() reads
    Row('{"reasoning": "ok", "score": "\u00b2"}', 0),  # E:192 int() raises, E:247-249
    Row('{"reasoning": "ok", "score": "-1"}', 0),  # E:191, E:200
    Row('{"reasoning": "ok", "score": [4, 5]}', 4),  # E:187-188 first entry only
    Row('{"reasoning": "ok", "score": [4.0]}', 4),  # E:193-194
    Row('{"reasoning": "ok", "score": 4.5}', 4, "4.5 is not a whole score"),  # E:193-194 truncates
    Row('{"reasoning": "ok", "score": [5.9]}', 5, "5.9 is not a whole score"),  # E:193-194 truncates
    Row('{"reasoning": "ok", "score": true}', 1, "true is not a score"),  # E:193-194 true is 1
    Row('{"reasoning": "ok", "score": [true]}', 1, "true is not a score"),  # E:187-188, E:193-194
    Row('{"reasoning": "ok", "score": false}', 0),  # E:193 false is 0, E:200
    Row('{"reasoning": "ok", "score": [0]}', 0),  # E:193, E:200 reads 1-5 only
    Row('{"reasoning": "ok", "score": 0.5}', 0),  # E:193, E:200
    Row('{"reasoning": "ok", "score": -1}', 0),  # E:193, E:200
    Row('{"reasoning": "ok", "score": [6]}', 0),  # E:193, E:200
    Row('{"reasoning": "ok", "score": [10]}', 1, "10 is not a score from 1 to 5"),  # E:193, E:200 reads its 1
    Row('{"reasoning": "ok", "score": 45}', 4, "45 is not a score from 1 to 5"),  # E:193, E:200 reads its 4
    Row('{"reasoning": "ok", "score": NaN}', 0),  # E:193, E:200
    Row('{"reasoning": "ok", "score": []}', 0),  # E:187 an empty list stays, E:200
    Row('{"reasoning": "ok", "score": [[4]]}', 0),  # E:187-188 one level only, E:200
    Row('{"reasoning": "ok", "score": {"value": 4}}', 0),  # E:193, E:200
    Row('{"reasoning": "ok"}', 0),  # E:186, E:200
    Row('{"score": 7, "reasoning": "ok", "score": 4}', 4),  # E:184 a repeated key keeps its last value
    Row('{"reasoning": "ok", "score": 7}\n"score": 4', 4),  # E:193 passes 7 over, E:200 the first match
    Row('Draft "score": 3\n{"reasoning": "ok", "score": 7}', 3),  # E:200 searches the whole answer
    Row('Draft "score": 3\n{"reasoning": "ok", "score": 5}', 5),  # E:193-194 the object before E:200
    Row('{"reasoning": "says \\"score\\": [1]", "score": [5]}', 5),  # E:184
    Row('{"reasoning": "says \\"score\\": [1]", "score": 9}', 0),  # E:200 an escaped key does not match
    Row('{"reasoning": "cut off", "score": [2', 2),  # E:180 no '}', E:200-202
    Row('{"reasoning": "cut off", "score": 4.0', 4),  # E:200-202
    Row('{"reasoning": "cut off", "score": [3.5', 3, "3.5 is not a whole score"),  # E:200 reads its 3
    Row('{"reasoning": "cut off", "score": [10', 1, "10 is not a score from 1 to 5"),  # E:200 reads its 1
    Row('{"reasoning": "cut off", "score": "3"', 0),  # E:200 no quoted digit
    Row('{"reasoning": "cut before the score", "sco', 0),  # E:200
    Row("", 0),  # E:175-176
    Row("I cannot judge this image.", 0),  # E:200
    Row(DEEP, 0),  # E:184 raises RecursionError, E:247-249
]

INSTRUCTION_FOLLOWING = [
    Row('{"reasoning": "ok", "score": "4.0"}', 0),  # G:444 not all digits, G:451, G:460 no quoted digit
    Row('{"reasoning": "ok", "score": 7}\nFinal Score: 4', 4),  # G:446 passes 7 over, G:451-456
    Row('{"reasoning": "ok", "score": [3]\nFinal Score: 4', 4),  # G:433 no '}', G:451-456 before G:460
    Row("**Final Analysis**: Red.\n**Final Alignment Rating: 4**\n\\boxed{4}", 4),  # G:404-416
    Row("\\boxed{[3]}", 3),  # G:404-409
    Row("\\boxed{{2}}", 2),  # G:404-409
    Row("\\boxed{ 2 }", 2),  # G:404-409
    Row("Final Alignment Rating: 2\n\\boxed{5}", 5),  # G:404-416 the box first
    Row("\\boxed{4.5}", 0),  # G:405 the box needs its brace after the digit, G:463
    Row("\\boxed{4.5}\nFinal Alignment Rating: 4", 4),  # G:405, G:418-430
    Row("\\boxed{6}", 0),  # G:405, G:463
    Row("\\boxed{0}", 0),  # G:405, G:463
    Row("\\boxed{}", 0),  # G:405, G:463
    Row("\\boxed{four}", 0),  # G:405, G:463
    Row("**Final Alignment Rating: [3]**", 3),  # G:418-423
    Row("**Final Alignment Rating: 4.0**", 4),  # G:418-423
    Row("Final Alignment Rating: 4.5", 4, "4.5 is not a whole score"),  # G:419 reads its 4
    Row("Final Alignment Rating: 45", 4, "45 is not a score from 1 to 5"),  # G:419 reads its 4
    Row('Final Alignment Rating: 6\n{"score": [2]}', 2),  # G:419 no match, G:440-447
    Row("Final Alignment Rating: 6\nFinal Score: 4", 4),  # G:419, G:451-456
    Row('{"reasoning": "ok", "score": [3]}', 3),  # G:440-447
    Row('{"reasoning": "ok", "score": "3"}', 3),  # G:442-447
    Row('{"reasoning": "ok", "score": 4.5}', 4, "4.5 is not a whole score"),  # G:446-447 truncates
    Row('{"reasoning": "ok", "score": true}', 1, "true is not a score"),  # G:446-447 true is 1
    Row('Final Score: 1\n{"score": [2]}', 2),  # G:432-447 the object before G:451
    Row("Final Score: 1", 1),  # G:451-456
    Row("Final Score: [5]", 5),  # G:451-456
    Row("Final Score: 10", 1, "10 is not a score from 1 to 5"),  # G:452 reads its 1
    Row("Final Score: 2.5", 2, "2.5 is not a whole score"),  # G:452 reads its 2
    Row('{"reasoning": "ok", "score": 7}\n"score": 4', 4),  # G:446, G:460-462
    Row('{"reasoning": "ok", "score": [3]', 3),  # G:433 no '}', G:460-462
    Row('"score": [3.5', 3, "3.5 is not a whole score"),  # G:460 reads its 3
    Row("Rating: 5", 0),  # G:463
    Row("", 0),  # G:400-401
]

QUALITY = [
    Row('{"score": ["4", "3", "5"], "reasoning": "cut', 0),  # G:362 no '}', G:378 and G:387 no quoted digits
    Row('{"score": [4, 3, 5.0], "reasoning": "cut', 0),  # G:378 and G:387 single digits only
    Row('{"score": [[4], [3], [5]], "reasoning": "ok"}', 0),  # G:182-184 a list is no number, G:378, G:387
    Row('{"score": [4, 3, 5, 2], "reasoning": "first guess was [4.5, 3, 5]"}', (4, 3, 5)),  # G:180 first three
    Row('Draft "score": [3.5, 4, 4]\n{"score": [4, 4, 4], "reasoning": "ok"}', (4, 4, 4)),  # G:363, G:370-373
    Row('{"score": [6, 3, 5], "reasoning": "corrected to [4, 3, 5]"}', (4, 3, 5)),  # G:185, G:378, G:386-393
    Row('{\n  "score" : [4, 3, 5],\n  "reasoning" : "Sharp."\n}', (4, 3, 5)),  # G:370-373
    Row('```json\n{"score": [2, 2, 1], "reasoning": "Blurry."}\n```', (2, 2, 1)),  # G:363
    Row('{"score": ["4", "4", "3"], "reasoning": "ok"}', (4, 4, 3)),  # G:182 float() reads a string
    Row('{"score": [" 4 ", 3, 5]}', (4, 3, 5)),  # G:182
    Row('{"score": [4.0, 3, 5]}', (4, 3, 5)),  # G:182
    Row('{"score": ["4.0", 3, 5]}', (4, 3, 5)),  # G:182
    Row('{"score": [4, 3, 5, "x"]}', (4, 3, 5)),  # G:180 first three only
    Row('{"score": [4.5, 3, 3]}', (4, 3, 3), "aesthetics 4.5 is not a whole score"),  # G:182 truncates
    Row('{"score": ["4.5", 3, 3]}', (4, 3, 3), 'aesthetics "4.5" is not a whole score'),  # G:182 truncates
    Row('{"score": [5.9, 3, 3]}', (5, 3, 3), "aesthetics 5.9 is not a whole score"),  # G:182 truncates
    Row('{"score": [true, 3, 3]}', (1, 3, 3), "aesthetics true is not a score"),  # G:182 true is 1
    Row('{"score": [false, 3, 3]}', 0),  # G:185, G:378, G:387
    Row('{"score": [4, 3, 7]}', 0),  # G:185, G:378, G:387
    Row('{"score": [0, 3, 3]}', 0),  # G:185
    Row('{"score": [0.5, 3, 3]}', 0),  # G:182 truncates to 0, G:185
    Row('{"score": [4, 3]}', 0),  # G:177
    Row('{"score": [4, 3, "x"]}', 0),  # G:183
    Row('{"score": "4, 3, 5"}', 0),  # G:177, G:378, G:387
    Row('{"score": [7, 3, 5], "reasoning": "was [4.5, 3, 5]"}', 0),  # G:185, G:387 single digits only
    Row('{"score": [[4, 3, 5]]}', (4, 3, 5)),  # G:177, G:378, G:386-393 the inner list
    Row('{"score": [NaN, 3, 3], "reasoning": "see [4, 3, 5]"}', (4, 3, 5)),  # G:182-184 int() refuses NaN
    Row('{"score": [Infinity, 3, 3], "reasoning": "see [4, 3, 5]"}', 0),  # G:182 overflows, G:517-519
    Row('{"score": [7, Infinity, 3], "reasoning": "see [4, 3, 5]"}', (4, 3, 5)),  # G:185 stops at 7, G:386
    Row('Draft "score": [2, 2, 2]\n{"score": [7, 3, 5]}', (2, 2, 2)),  # G:185, G:377-384 the first match
    Row('Scale [1, 2, 3]; "score": [4, 4, 4]', (4, 4, 4)),  # G:377-384 before G:386
    Row("Scores: [3, 4, 2]", (3, 4, 2)),  # G:386-393
    Row('{\n  "score" : [5, 4, 4],\n  "reasoning" : "cut off mid-sent', (5, 4, 4)),  # G:362, G:377-384
    Row('{"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}', 0),  # G:370, G:395
    Row("looks good", 0),  # G:395
    Row(DEEP, 0),  # G:366 raises RecursionError, G:517-519
]

TABLE = [
    *[pytest.param(parse_json_score, row, id=f"edit-{i}") for i, row in enumerate(EDIT)],
    *[pytest.param(parse_alignment_rating, row, id=f"if-{i}") for i, row in enumerate(INSTRUCTION_FOLLOWING)],
    *[pytest.param(parse_quality_scores, row, id=f"quality-{i}") for i, row in enumerate(QUALITY)],
]


@pytest.mark.parametrize(("parse", "row"), TABLE)
def test_each_answer_is_scored_as_the_release_scores_it(parse: Callable[[str], ParsedAnswer], row: Row) -> None:
    if row.refused is not None:
        with pytest.raises(ParseError) as refusal:
            parse(row.answer)
        assert row.refused in str(refusal.value) and "found" not in str(refusal.value)
    elif row.release == 0:
        with pytest.raises(ParseError):
            parse(row.answer)
    else:
        parsed = parse(row.answer)
        wanted = row.release if isinstance(row.release, tuple) else (row.release,)
        assert tuple(match.value for match in parsed.scores.values()) == wanted
        # the offset, where there is one, is the score's own digit, whose probabilities give the expected score
        for match in parsed.scores.values():
            assert match.offset is None or row.answer[match.offset] == str(match.value)


def test_the_table_holds_both_outcomes_for_every_judge() -> None:
    for rows in (EDIT, INSTRUCTION_FOLLOWING, QUALITY):
        assert any(row.release == 0 for row in rows)
        assert any(row.release != 0 and row.refused is None for row in rows)
        assert any(row.refused is not None for row in rows)
