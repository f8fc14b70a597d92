"""A prompt file every rollout task reads, so a benchmark can run any task without knowing its format.

Each line is a JSONL record holding what each task's reader (`rl_workers.tasks`) takes from it: the
text-to-image reader its "prompt", the editing reader its "source" (an image saved next to the file)
and "instruction". A reader leaves the other keys alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt of an image to generate
    source: Image.Image  # the image to edit
    instruction: str  # the edit asked of it
    id: str | None = None  # None: the reader names it after its line


def write_prompt_file(folder: Path, prompts: Sequence[Prompt]) -> Path:
    """Write the file (and the source images) into `folder`; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, prompt in enumerate(prompts):
        source = f"source-{n}.png"
        prompt.source.save(folder / source)
        record = {"prompt": prompt.text, "source": source, "instruction": prompt.instruction}
        lines.append(json.dumps(record | ({"id": prompt.id} if prompt.id is not None else {})) + "\n")
    path = folder / "prompts.jsonl"
    path.write_text("".join(lines))
    return path
