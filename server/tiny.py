"""A tiny Qwen3-VL critic built on this machine, for tests and `firm-serve --tiny`.

Nothing is downloaded. The builder trains a byte-level BPE tokenizer on the judges' own
prompts (digits stay single tokens, as in Qwen's tokenizer), wraps it with the real Qwen3-VL
processor classes, creates a randomly initialised model of a few hundred thousand weights, and
teaches it the four answer formats with a short teacher-forced fine-tune on synthetic examples
(an edit that shows the colour the instruction names scores 5, an unchanged image scores 1).
It is saved with `save_pretrained` and served through exactly the path of a real checkpoint.
Its scores are toys: it exercises the service, not the critic.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from foundation.bpe import SPECIAL_TOKENS, train_bpe
from foundation.cache import build_once
from server.judges import JUDGES, edit_fields, gen_fields, load_judges
from server.judges.answers import alignment_answer, json_score_answer, quality_answer

log = logging.getLogger(__name__)

TINY_VERSION = "5"
# The chat layout of Qwen3-VL: one turn per message, images as vision placeholders in place.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIDE = 64  # the processor's pixel budget is IMAGE_SIDE**2: 4 visual tokens per image

# Sources are cool colours and instructions ask for warm ones, so whether an edit was done can
# be read from the edited image alone: a rule small enough for a tiny model to learn quickly.
WARM = {"red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 40)}
COOL = {"blue": (40, 70, 220), "green": (40, 170, 70), "purple": (140, 60, 170)}
COLOURS = {**WARM, **COOL}
REQUIREMENTS = ("", "flat colours", "a plain grey background", "the square in the centre")
INSTRUCTIONS = ("Make the square {}.", "Change the colour of the square to {}.", "Paint the square {}.")


@dataclass(frozen=True)
class Example:
    judge: str
    images: tuple[Image.Image, ...]
    fields: dict[str, str | None]
    answer: str


def draw_square(colour: str, background: tuple[int, int, int] = (235, 235, 235)) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), background)
    ImageDraw.Draw(image).rectangle((12, 12, 52, 52), fill=COLOURS[colour])
    return image


def _edit_examples(rng: random.Random) -> Iterator[Example]:
    while True:
        source, target = rng.choice(list(COOL)), rng.choice(list(WARM))
        done = rng.random() < 0.5
        images = (draw_square(source), draw_square(target if done else source))
        fields = edit_fields(rng.choice(INSTRUCTIONS).format(target))
        if done:
            why, execution, consistency = f"The square is now {target}; the rest is kept.", 5, 4
        else:
            why, execution, consistency = "The image is unchanged.", 1, 5
        yield Example("edit_execution", images, fields, json_score_answer(why, execution))
        yield Example("edit_consistency", images, fields, json_score_answer(why, consistency))


def _gen_examples(rng: random.Random) -> Iterator[Example]:
    while True:
        asked = rng.choice(list(WARM))
        shown = asked if rng.random() < 0.5 else rng.choice(list(COOL))
        image = draw_square(shown)
        fields = gen_fields(f"a {asked} square", rng.choice(REQUIREMENTS))
        if shown == asked:
            check, analysis, rating = f"The square is {asked}, as asked.", f"The image shows a {asked} square.", 5
        else:
            check, analysis, rating = f"The square is {shown}, not {asked}.", "The colour is wrong.", 1
        answer = alignment_answer([("Colour", check)], analysis, rating)
        yield Example("gen_instruction_following", (image,), fields, answer)
        subscores = (4, 4, 3) if shown in WARM else (3, 4, 4)
        yield Example("gen_quality", (image,), {}, quality_answer(subscores, "Flat colours and clean edges."))


def synthetic_examples(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    edit, gen = _edit_examples(rng), _gen_examples(rng)
    return [next(edit) if i % 2 == 0 else next(gen) for i in range(count)]


# ----------------------------------------------------------------------------- building


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(corpus, list(SPECIAL_TOKENS), vocab_size)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def _processor(tokenizer: Any) -> Any:
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": IMAGE_SIDE * IMAGE_SIDE},
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinyShape:
    """Layer sizes. The default is the smallest that learns the formats on a CPU in under a minute;
    `VLLM_SHAPE` uses 32-wide attention heads, the narrowest vLLM's CPU attention kernels take (and the
    fastest to build)."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    vision_hidden: int = 32
    vision_heads: int = 2


CPU_SHAPE = TinyShape()
VLLM_SHAPE = TinyShape(
    hidden=64, heads=2, kv_heads=1, head_dim=32, mrope_section=(4, 6, 6), vision_hidden=64, vision_heads=2
)
SHAPES = {"cpu": CPU_SHAPE, "vllm": VLLM_SHAPE}


def _model(tokenizer: Any, seed: int, shape: TinyShape) -> Any:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": shape.hidden,
            "intermediate_size": 2 * shape.hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": list(shape.mrope_section),
                # As in the released Qwen3-VL configs: vLLM reads a missing key as False, while
                # transformers always interleaves, so without it image positions differ between them.
                "mrope_interleaved": True,
            },
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": 2 * shape.vision_hidden,
            "num_heads": shape.vision_heads,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": shape.hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model


def _chat(processor: Any, example: Example, prompts: dict[str, Any]) -> tuple[str, list[Image.Image]]:
    parts = prompts[example.judge].prompt(example.images, **example.fields)
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return text, list(example.images)


def _batch(processor: Any, examples: list[Example], prompts: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forcing inputs; the loss covers only the answer and its end-of-turn token."""
    chats = [_chat(processor, e, prompts) for e in examples]
    prompt_lengths = [len(processor(text=[t], images=imgs, return_tensors="pt")["input_ids"][0]) for t, imgs in chats]
    full = [t + e.answer + "<|im_end|>" for (t, _), e in zip(chats, examples, strict=True)]
    images = [img for _, imgs in chats for img in imgs]
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=full, images=images, padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return dict(inputs)


def _teach(model: Any, processor: Any, examples: list[Example], steps: int, seed: int, device: str) -> float:
    import torch

    prompts = load_judges()
    model.to(device)
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        batch = {k: v.to(device) for k, v in _batch(processor, rng.sample(examples, 8), prompts).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        loss_value = loss.item()
        if step % 50 == 0:
            log.info("tiny critic: step %d/%d, loss %.4f", step, steps, loss_value)
    model.to("cpu").eval()
    return loss_value


def build_tiny_checkpoint(path: Path, *, steps: int = 300, seed: int = 0, shape: str = "cpu") -> Path:
    """Build, teach and save the tiny critic in `path` (created; must not exist).

    `shape` is "cpu" (the default, taught on the CPU) or "vllm" (taught on a GPU when there is one).
    """
    import torch

    torch.manual_seed(seed)
    judges = load_judges()
    examples = synthetic_examples(512, seed)
    corpus = [judges[e.judge].prompt((), **e.fields)[-1] + " " + e.answer for e in examples]
    tokenizer = _train_tokenizer(corpus, vocab_size=1024)
    processor = _processor(tokenizer)
    model = _model(tokenizer, seed, SHAPES[shape])
    device = "cuda" if shape != "cpu" and torch.cuda.is_available() else "cpu"
    loss = _teach(model, processor, examples, steps, seed, device)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(path)
    card = {"version": TINY_VERSION, "shape": shape, "final_loss": loss, "steps": steps, "judges": sorted(JUDGES)}
    (path / "tiny_critic.json").write_text(json.dumps(card, indent=2))
    (path / "README.md").write_text(
        "Tiny randomly initialised Qwen3-VL critic built by firm-reward-server for tests.\n"
        "It writes well-formed FIRM answers, but its scores are meaningless.\n"
    )
    log.info("tiny critic built in %s (final loss %.4f)", path, loss)
    return path


def ensure_tiny_checkpoint(cache_dir: Path, shape: str = "cpu") -> Path:
    """The tiny critic in `cache_dir`, built on first use."""
    suffix = "" if shape == "cpu" else f"-{shape}"
    target = Path(cache_dir) / f"tiny-qwen3-vl-v{TINY_VERSION}{suffix}"
    return build_once(target, "tiny_critic.json", lambda path: build_tiny_checkpoint(path, shape=shape))
