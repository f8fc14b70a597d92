"""Supervised fine-tuning records in exactly the prompt format the server's judges send.

A record is one judge call and the answer the critic should give to it: the images (file paths,
relative to the records file), the judge's rendered prompt and the answer, as a chat in the
common `messages` layout. The prompt is rendered by `server.judges`, never written here, so a
critic trained on these records is asked at serving time exactly what it learned.

    >>> r = make_record("pair-1", "edit_execution", ["a.png", "b.png"], {"instruction": "Make it red."},
    ...                 '{"reasoning": "It is red.", "score": [5]}')
    >>> [part["type"] for part in r["messages"][0]["content"]], r["score"], r["id"]
    (['image', 'image', 'text'], 5, 'pair-1/edit_execution')
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.judges import JUDGES, Judge, ParseError, load_judges
from server.settings import Settings
from training.manifest import json_lines

# firm-serve's default pixel budget: training and curation downscale images as the server does
SERVED_PIXEL_BUDGET: int = Settings.model_fields["image_pixel_budget"].default


@dataclass(frozen=True)
class ImageRef:
    """A file standing in for an image in a judge's prompt."""

    path: str


class AnswerMismatch(ValueError):
    """An answer the server's parser would not read back as the intended score."""


_JUDGES: dict[str, Judge] = {}


def judge(name: str) -> Judge:
    """The server's judge `name`, with its packaged template (read once per process)."""
    if not _JUDGES:
        _JUDGES.update(load_judges())
    return _JUDGES[name]


def checked_answer(judge_name: str, answer: str, score: int) -> str:
    """The answer, after making sure the server's parser reads `score` back from it."""
    try:
        parsed = JUDGES[judge_name].parse(answer)
    except ParseError as exc:
        raise AnswerMismatch(f"{judge_name}: the server could not parse the answer: {exc}") from exc
    found = parsed.scores["score"].value
    if found != score:
        raise AnswerMismatch(f"{judge_name}: the server would read score {found}, not {score}")
    return answer


def make_record(
    item_id: str,
    judge_name: str,
    images: Sequence[str],
    fields: Mapping[str, str],
    answer: str,
    *,
    score: int | None = None,
    evidence: Mapping[str, Any] | None = None,
    the_judge: Judge | None = None,
) -> dict[str, Any]:
    """One record: `images` + the judge's prompt -> `answer`. `score` defaults to what the answer says."""
    chosen = the_judge or judge(judge_name)
    parts = chosen.prompt(tuple(ImageRef(p) for p in images), **fields)
    content = [
        {"type": "image", "image": part.path} if isinstance(part, ImageRef) else {"type": "text", "text": part}
        for part in parts
    ]
    if score is None:
        score = chosen.spec.parse(answer).scores["score"].value
    return {
        "id": f"{item_id}/{judge_name}",
        "item_id": item_id,
        "judge": judge_name,
        "task": chosen.spec.task,
        "fields": dict(fields),
        "score": score,
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "evidence": dict(evidence or {}),
    }


def relative_path(image: Path, records_dir: Path) -> str:
    """How a record names an image: relative to the records file's folder, so both can move together."""
    return os.path.relpath(image.resolve(), records_dir.resolve())


def record_images(record: Mapping[str, Any]) -> list[str]:
    """The image paths of a record's prompt, in prompt order."""
    return [p["image"] for p in record["messages"][0]["content"] if p["type"] == "image"]


def record_answer(record: Mapping[str, Any]) -> str:
    content = record["messages"][1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a JSONL file; a malformed line raises with its line number."""
    for number, record in json_lines(path):
        if "messages" not in record or len(record["messages"]) != 2:
            raise ValueError(f"{path}:{number}: a record needs 'messages' with a user and an assistant turn")
        yield record
