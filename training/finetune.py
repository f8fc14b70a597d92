"""`firm-train`: supervised fine-tuning of a Qwen3-VL critic on curated records.

    firm-train edit.jsonl --base-model Qwen/Qwen3-VL-8B-Instruct --output critics/my-edit-critic

The defaults are the paper's recipe (full fine-tune, learning rate 1e-5, cosine schedule, 10%
warm-up, one epoch). `--lora` trains low-rank adapters instead and merges them into the weights
at the end. The output folder holds the model, its processor and tokenizer, and a model card
(README.md, plus firm_training.json with the settings and the loss before and after), and is
served as it is: `firm-serve --edit-model critics/my-edit-critic --gen-model none`.

A record whose answer is longer than the served critic may write for its judge (`--max-answer-tokens`;
by default firm-serve's budget of the judge's task, `firm-train --help` lists them) is left out with a
warning: it would teach answers cut off at serving. The records must have been rendered with
the prompt set given by `--prompts` (this project's own by default); it is recorded next to the
weights (firm_prompts.json), and firm-serve serves the critic with it.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.tasks import SERVER_TASKS
from training.model_card import write_model_card
from training.prompt_set import add_prompt_flags, check_records, record_prompt_set, released_prompts, training_judges
from training.records import SERVED_PIXEL_BUDGET, read_records
from training.sft_data import Collator, Example, load_examples, split_long_answers

log = logging.getLogger("firm-train")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the language model's projections
# what firm-serve lets a judge of each task write, by default
SERVED_MAX_NEW_TOKENS: dict[str, int] = {name: task.max_new_tokens for name, task in SERVER_TASKS.items()}


def _budgets() -> str:
    """The served budgets in words, e.g. '256 for image editing and 8192 for text-to-image generation'."""
    said = [f"{task.max_new_tokens} for {task.spec.title}" for task in SERVER_TASKS.values()]
    return " and ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-train",
        description="Fine-tune a Qwen3-VL checkpoint into a FIRM critic on records from firm-curate. "
        "The loss covers the critic's answers only; the result loads in firm-serve unchanged.",
    )
    add = parser.add_argument
    add("records", type=Path, nargs="+", help="JSONL files of records (firm-curate output).")
    add("--base-model", required=True, help="Checkpoint to start from: hub id or local folder.")
    add("--output", type=Path, required=True, help="Folder for the fine-tuned critic (must be empty or new).")
    add("--revision", help="Hub revision of the base model.")
    add("--lora", action="store_true", help="Train LoRA adapters (merged into the weights when saving).")
    add("--lora-r", type=int, default=16, help="LoRA rank (default: 16).")
    add("--lora-alpha", type=int, default=32, help="LoRA alpha (default: 32).")
    add("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05).")
    add("--lora-targets", default=LORA_TARGETS, help=f"Modules LoRA adapts, comma-separated (default: {LORA_TARGETS}).")
    add("--freeze-vision", action="store_true", help="Full fine-tune: keep the vision encoder fixed.")
    add("--learning-rate", type=float, default=1e-5, help="Peak learning rate (paper: 1e-5).")
    add("--lr-scheduler", default="cosine", help="Learning-rate schedule (paper: cosine).")
    add("--warmup-ratio", type=float, default=0.1, help="Share of steps warming up (paper: 0.1).")
    add("--epochs", type=float, default=1.0, help="Passes over the records (paper: 1).")
    add("--max-steps", type=int, default=-1, help="Stop after this many optimiser steps (default: epochs decide).")
    add("--batch-size", type=int, default=1, help="Records per device per step (default: 1).")
    add("--grad-accum", type=int, default=8, help="Batches accumulated per optimiser step (default: 8).")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0).")
    add("--gradient-checkpointing", action="store_true", help="Trade compute for memory (8B on one GPU).")
    add("--device", default="auto", help="auto, cpu, cuda (default: auto).")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="Training dtype; auto is bf16 on GPU.")
    add(
        "--image-pixel-budget",
        type=int,
        default=SERVED_PIXEL_BUDGET,
        help="Downscale images as firm-serve does (default).",
    )
    add(
        "--max-answer-tokens",
        type=int,
        default=None,
        help="Leave out records whose answer has more tokens: the served critic would be cut off (default: "
        f"firm-serve's budget of the record's judge, {_budgets()}; 0 keeps every record).",
    )
    add_prompt_flags(parser, "The prompt set the records were rendered with, checked and recorded with the critic")
    add("--measure-examples", type=int, default=32, help="Records whose loss is measured before and after (0: skip).")
    add("--logging-steps", type=int, default=10, help="Log the training loss every N steps (default: 10).")
    add("--save-steps", type=int, default=0, help="Also keep a trainer checkpoint every N steps (default: never).")
    add("--seed", type=int, default=0, help="Seed of the shuffle, dropout and LoRA init (default: 0).")
    return parser


@dataclass
class Loaded:
    model: Any
    processor: Any
    device: str
    dtype: Any


def load_processor(args: argparse.Namespace) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(args.base_model, revision=args.revision)


def load_base(args: argparse.Namespace, processor: Any) -> Loaded:
    """The base checkpoint through the same classes firm-serve loads it with."""
    from transformers import AutoModelForImageTextToText, set_seed

    from server.engines.transformers import resolve_device, resolve_dtype

    set_seed(args.seed)  # before any weight is made: LoRA's initial weights come from this seed
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(args.base_model, revision=args.revision, dtype=dtype)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif args.freeze_vision:
        for name, parameter in model.named_parameters():
            if ".visual." in f".{name}" or name.startswith("visual."):
                parameter.requires_grad_(False)
    return Loaded(model.to(device), processor, device, dtype)


def servable_examples(
    args: argparse.Namespace, processor: Any, records: Mapping[Path, Sequence[Mapping[str, Any]]]
) -> tuple[list[Example], list[str]]:
    """The records to train on, and the ids of those left out for answers the served critic could not finish."""
    examples = load_examples(args.records, records)
    if args.max_answer_tokens == 0:
        return examples, []
    budgets = {t: args.max_answer_tokens or b for t, b in SERVED_MAX_NEW_TOKENS.items()}
    kept, too_long = split_long_answers(examples, processor.tokenizer, budgets)
    if too_long:
        shown = ", ".join(too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        log.warning(
            "%d of %d records have answers over their judge's budget (%s tokens), which the served critic "
            "would cut off; they are left out: %s",
            len(too_long),
            len(examples),
            budgets,
            shown,
        )
    if not kept:
        raise ValueError(f"every record's answer is over its budget of {budgets} tokens (--max-answer-tokens)")
    return kept, too_long


def measure_loss(loaded: Loaded, collator: Collator, examples: Sequence[Example]) -> float | None:
    """Mean answer-token loss over `examples`, one at a time, without training."""
    import torch

    if not examples:
        return None
    loaded.model.eval()
    total = 0.0
    with torch.inference_mode():
        for example in examples:
            batch = {k: v.to(loaded.device) for k, v in collator([example]).items()}
            total += float(loaded.model(**batch).loss)
    return total / len(examples)


class _LossLog:
    """Collects the training losses the Trainer logs."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        log_list: list[dict[str, float]] = []
        self.entries = log_list

        class Callback(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs:
                    log_list.append({"step": state.global_step, "loss": float(logs["loss"])})

        self.callback = Callback()


def train(
    loaded: Loaded, collator: Collator, examples: list[Example], args: argparse.Namespace
) -> list[dict[str, float]]:
    """Run the Trainer; returns the logged losses."""
    import torch
    from transformers import Trainer, TrainingArguments

    settings = TrainingArguments(
        output_dir=str(args.output / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of the steps
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=loaded.device == "cpu",
        bf16=loaded.dtype == torch.bfloat16,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        dataloader_num_workers=0,
        optim="adamw_torch",
        disable_tqdm=not sys.stderr.isatty(),
    )
    losses = _LossLog()
    trainer = Trainer(
        model=loaded.model, args=settings, train_dataset=examples, data_collator=collator, callbacks=[losses.callback]
    )
    trainer.train()
    return losses.entries


def save(loaded: Loaded, output: Path, lora: bool) -> None:
    """Weights (LoRA merged in), processor and tokenizer: a folder firm-serve loads as a checkpoint."""
    model = loaded.model.merge_and_unload() if lora else loaded.model
    model.eval()
    model.save_pretrained(output)
    loaded.processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    loaded.processor.save_pretrained(output)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and save; returns the training report that the model card is written from."""
    args = build_parser().parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        raise FileExistsError(f"{args.output} is not empty; choose a new folder")
    records = {path: list(read_records(path)) for path in args.records}  # read once, checked, then trained on
    names = {record["judge"] for found in records.values() for record in found}
    judges = training_judges(args.prompts, names, released_prompts(args))
    for path in args.records:
        check_records(records[path], judges, args.prompts)
    processor = load_processor(args)
    examples, too_long = servable_examples(args, processor, records)
    loaded = load_base(args, processor)
    collator = Collator(loaded.processor, args.image_pixel_budget)
    probe = random.Random(args.seed).sample(examples, min(args.measure_examples, len(examples)))
    before = measure_loss(loaded, collator, probe)
    log.info("%d records; loss before %s", len(examples), before)
    losses = train(loaded, collator, examples, args)
    after = measure_loss(loaded, collator, probe)
    log.info("loss after %s", after)
    args.output.mkdir(parents=True, exist_ok=True)
    save(loaded, args.output, args.lora)
    record_prompt_set(args.output, args.prompts, judges)
    if not args.save_steps and (args.output / "trainer").exists():
        shutil.rmtree(args.output / "trainer")  # nothing kept there; the critic is the folder itself
    report = {
        "base_model": args.base_model,
        "records": [str(p) for p in args.records],
        "examples": len(examples),
        "left_out": {"answer_over_max_tokens": too_long},
        "method": "lora (merged)" if args.lora else "full",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "records"},
        "loss": {"before": before, "after": after, "measured_on": len(probe), "logged": losses},
    }
    write_model_card(args.output, report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(argv)
    except (FileExistsError, ValueError, OSError) as exc:
        sys.exit(f"firm-train: {exc}")
    loss = report["loss"]
    fmt = lambda x: "n/a" if x is None or math.isnan(x) else f"{x:.4f}"  # noqa: E731
    print(
        f"firm-train: {report['examples']} records, loss {fmt(loss['before'])} -> {fmt(loss['after'])}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
