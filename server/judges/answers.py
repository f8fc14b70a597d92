"""The answers the released critics write, built from their parts.

The tiny test critic is taught these, and the curation pipelines write them into fine-tuning
records, so both speak exactly the formats the parsers read from the released checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def json_score_answer(reasoning: str, score: int) -> str:
    """The edit judges' answer.

    >>> print(json_score_answer("The car is red.", 5))
    {
    "reasoning" : "The car is red.",
    "score" : [5]
    }
    """
    return f'{{\n"reasoning" : {json.dumps(reasoning, ensure_ascii=False)},\n"score" : [{score}]\n}}'


def alignment_answer(checks: Sequence[tuple[str, str]], analysis: str, rating: int) -> str:
    """The instruction-following answer: one entry per requirement, the final analysis, the rating line
    and the box that repeats it.

    >>> print(alignment_answer([("A red car", "Met.")], "All there.", 5))
    1. **A red car**:
    - Met.
    <BLANKLINE>
    **Final Analysis**:
    All there.
    <BLANKLINE>
    **Final Alignment Rating: 5**
    \\boxed{5}
    """
    entries = "".join(f"{i}. **{name}**:\n- {check}\n\n" for i, (name, check) in enumerate(checks, start=1))
    return f"{entries}**Final Analysis**:\n{analysis}\n\n**Final Alignment Rating: {rating}**\n\\boxed{{{rating}}}"


def quality_answer(subscores: Sequence[int], reasoning: str) -> str:
    """The quality answer: aesthetics, technical quality, structure & texture as one list.

    >>> print(quality_answer((4, 3, 5), "Sharp."))
    {
      "score" : [4, 3, 5],
      "reasoning" : "Sharp."
    }
    """
    listed = ", ".join(str(s) for s in subscores)
    return f'{{\n  "score" : [{listed}],\n  "reasoning" : {json.dumps(reasoning, ensure_ascii=False)}\n}}'
