"""Fine-tuning batches from curated records, built the way the server builds its prompts.

Images are read and downscaled with the server's own image code, the user turn goes through the
checkpoint's chat template with `add_generation_prompt=True` exactly as the transformers engine
does, and the answer follows it with the end-of-turn token. Labels cover only the answer and
that token: the critic learns what to write, not what it is asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from server.engines.tokens import chat_content
from server.images import ImageLimits, load_image
from server.judges import JUDGES
from training.records import ImageRef, read_records, record_answer

IGNORE = -100
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class Example:
    """One record with its image paths resolved."""

    id: str
    parts: tuple[ImageRef | str, ...]
    answer: str
    task: str  # the task of the record's judge: whose answer budget applies


def load_examples(
    paths: Sequence[Path], records: Mapping[Path, Sequence[Mapping[str, Any]]] | None = None
) -> list[Example]:
    """Every record of the given JSONL files (read here unless `records` holds them already); image paths
    are relative to each file's folder."""
    examples = []
    for path in paths:
        base = Path(path).parent
        for record in records[path] if records is not None else read_records(Path(path)):
            parts: list[ImageRef | str] = []
            for part in record["messages"][0]["content"]:
                if part["type"] == "image":
                    parts.append(ImageRef(str(base / part["image"])))
                elif part["type"] == "text":
                    parts.append(part["text"])
                else:
                    raise ValueError(f"{path}: record {record.get('id')}: unknown content type {part['type']!r}")
            task = record.get("task") or JUDGES[record["judge"]].task
            examples.append(Example(str(record.get("id", len(examples))), tuple(parts), record_answer(record), task))
    if not examples:
        raise ValueError(f"no records in {', '.join(map(str, paths))}")
    return examples


def split_long_answers(
    examples: Sequence[Example], tokenizer: Any, max_tokens: Mapping[str, int]
) -> tuple[list[Example], list[str]]:
    """(examples whose answer fits in the token budget of their task, ids of the others)."""
    kept, too_long = [], []
    for example in examples:
        count = len(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
        if count <= max_tokens[example.task]:
            kept.append(example)
        else:
            too_long.append(example.id)
    return kept, too_long


def end_of_turn(tokenizer: Any) -> str:
    """The token that closes an assistant turn in the chat template (Qwen: <|im_end|>)."""
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


class Collator:
    """Turns examples into a padded teacher-forcing batch with answer-only labels."""

    def __init__(self, processor: Any, pixel_budget: int) -> None:
        self.processor = processor
        self.limits = ImageLimits(pixel_budget=pixel_budget)
        self.eos = end_of_turn(processor.tokenizer)

    def _image(self, ref: ImageRef) -> Image.Image:
        return load_image(Path(ref.path).read_bytes(), ref.path, self.limits)

    def prompt(self, example: Example) -> tuple[str, list[Image.Image]]:
        """The chat text the served critic sees for this record, and its images."""
        parts = [self._image(p) if isinstance(p, ImageRef) else p for p in example.parts]
        content, images = chat_content(parts)
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return text, images

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        prompts = [self.prompt(e) for e in examples]
        lengths = [
            len(self.processor(text=[text], images=images or None, return_tensors="pt")["input_ids"][0])
            for text, images in prompts
        ]
        texts = [text + e.answer + self.eos for (text, _), e in zip(prompts, examples, strict=True)]
        images = [image for _, batch_images in prompts for image in batch_images]
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        for row, length in enumerate(lengths):
            labels[row, :length] = IGNORE
        labels[batch["attention_mask"] == 0] = IGNORE
        batch["labels"] = labels
        return dict(batch)
