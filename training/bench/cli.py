"""`firm-bench`: FIRM-Bench evaluation of a critic, MAE against human scores.

    firm-bench path/to/FIRM-Bench --url http://127.0.0.1:8000 --output results/
    firm-bench bench/ --engine-args "--edit-model ./my-critic --gen-model none --device cuda"

Prints the paper's table with FIRM-8B and GPT-5 beside this critic, and writes `results.json`
(figures and every item's prediction), `table.txt` and `confusion.png` into --output.
Exit status: 0 when every item was scored, 1 when some failed (they are listed), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients import AsyncRewardClient
from training.bench.data import EDIT_FIELDS, GEN_FIELDS, BenchItem, load_edit_items, load_gen_items
from training.bench.plot import draw_confusions
from training.bench.report import metrics, per_item, table
from training.bench.scoring import InProcessScorer, Prediction, Scorer, score_items
from training.manifest import ManifestError, parse_field_map

_EPILOG = f"""\
folder layout: EDIT_FILE and GEN_FILE (JSONL, either may be absent) with images under --image-root.
edit columns: {", ".join(EDIT_FIELDS)} (dimension: execution or consistency; human: the 1-5 human score).
gen columns: {", ".join(GEN_FIELDS)} (difficulty: easy or hard; requirement optional).
Rename columns with --edit-field NAME=COLUMN and --gen-field NAME=COLUMN.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-bench",
        description="Score a FIRM-Bench style benchmark through a critic and report MAE against the human scores.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("folder", type=Path, help="Benchmark folder.")
    add("--edit-file", default="edit.jsonl", help="Editing items, relative to the folder (default: edit.jsonl).")
    add("--gen-file", default="gen.jsonl", help="Generation items, relative to the folder (default: gen.jsonl).")
    add("--image-root", type=Path, help="Folder image paths are relative to (default: the benchmark folder).")
    add("--edit-field", action="append", metavar="NAME=COLUMN", help="Column holding an editing field.")
    add("--gen-field", action="append", metavar="NAME=COLUMN", help="Column holding a generation field.")
    add("--id-field", default="id", help="Column holding the item id (default: id).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="Base URL of a running firm-serve (comma-separate several).")
    target.add_argument(
        "--engine-args",
        help="Score in this process instead, with a scoring service built from these firm-serve flags, "
        'e.g. "--edit-model ./critic --gen-model none --engine transformers".',
    )
    add("--api-key", help="API key of the server, when it needs one [env FIRM_API_KEY through the client].")
    add(
        "--score-mode",
        choices=["argmax", "expected"],
        default="argmax",
        help="Compare the written score (argmax, as the paper) or the expected score with the human one.",
    )
    add("--label", help="Name of this critic in the table (default: the model name the server reports).")
    add("--output", type=Path, default=Path("firm-bench-results"), help="Folder for the results (created).")
    add("--timeout-s", type=float, default=600.0, help="Client deadline per request (default: 600).")
    return parser


def load_items(args: argparse.Namespace) -> list[BenchItem]:
    root = args.image_root or args.folder
    items: list[BenchItem] = []
    edit_path, gen_path = args.folder / args.edit_file, args.folder / args.gen_file
    if edit_path.exists():
        items += load_edit_items(edit_path, parse_field_map(args.edit_field, EDIT_FIELDS), root, args.id_field)
    if gen_path.exists():
        items += load_gen_items(gen_path, parse_field_map(args.gen_field, GEN_FIELDS), root, args.id_field)
    if not items:
        raise ManifestError(f"no benchmark items: neither {edit_path} nor {gen_path} exists or holds any")
    return items


async def predict(args: argparse.Namespace, items: list[BenchItem]) -> tuple[list[Prediction], str]:
    """Predictions and the name of the model that made them."""
    if args.engine_args is not None:
        scorer = InProcessScorer(shlex.split(args.engine_args))
        await scorer.start()
        try:
            predictions = await score_items(scorer, items, args.score_mode)
        finally:
            await scorer.aclose()
        names = [m.name for m in scorer.service.cards()]
        return predictions, " + ".join(dict.fromkeys(names))
    settings: dict[str, Any] = {"timeout_s": args.timeout_s}
    if args.api_key:
        settings["api_key"] = args.api_key
    async with AsyncRewardClient(args.url.split(","), **settings) as client:
        client_scorer: Scorer = client
        predictions = await score_items(client_scorer, items, args.score_mode)
        names = [m.name for m in (await client.models()).models]
    return predictions, " + ".join(dict.fromkeys(names))


def write_results(args: argparse.Namespace, items: list[BenchItem], predictions: list[Prediction], model: str) -> str:
    figures = metrics(items, predictions)
    label = args.label or model
    text = table(figures, label)
    args.output.mkdir(parents=True, exist_ok=True)
    panels = draw_confusions(items, predictions, args.output / "confusion.png")
    results = {
        "label": label,
        "model": model,
        "score_mode": args.score_mode,
        "mae": figures,
        "confusion_panels": panels,
        "items": per_item(items, predictions),
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.output / "table.txt").write_text(text + "\n", encoding="utf-8")
    return text


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status."""
    args = build_parser().parse_args(argv)
    try:
        items = load_items(args)
        predictions, model = asyncio.run(predict(args, items))
    except (ManifestError, ValueError, OSError) as exc:
        print(f"firm-bench: {exc}", file=sys.stderr)
        return 2
    print(write_results(args, items, predictions, model))
    failed = [(i.id, p.error) for i, p in zip(items, predictions, strict=True) if p.value is None]
    for item_id, error in failed:
        print(f"firm-bench: {item_id} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
