"""`firm-bench`: FIRM-Bench evaluation of a critic, MAE against human scores.

    firm-bench path/to/FIRM-Bench --url http://127.0.0.1:8000 --output results/
    firm-bench bench/ --engine-args "--edit-model ./my-critic --gen-model none --device cuda"

Prints the paper's table with FIRM-8B and GPT-5 beside this critic, and writes `results.json`
(figures, confusion matrices and every item's prediction), `table.txt` and `confusion.png` into
--output. A task whose critic the server has switched off is skipped, with a note.
Exit status: 0 when every item was scored, 1 when some failed (they are listed), 2 for a usage
error or when no request could get through (a refused key, no server); what was scored is kept.
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

import httpx

from clients import AsyncRewardClient
from clients.errors import FirmError
from clients.protocol import ModelCard
from training.bench.data import BenchItem, load_split
from training.bench.plot import confusion_matrices, draw_confusions
from training.bench.report import metrics, per_item, table
from training.bench.scoring import BenchAborted, BenchScores, score_items
from training.bench.splits import SPLITS, Split
from training.manifest import ManifestError, parse_field_map


def _columns(split: Split) -> str:
    """The help's line on a split's columns, e.g. 'gen columns: image, prompt, ... (difficulty: easy or hard; ...)'."""
    notes = [f"{split.group}: {' or '.join(split.groups)}", "human: the 1-5 human score"]
    if split.requirement:
        notes.append(f"{split.requirement} optional")
    return f"{split.task} columns: {', '.join(split.columns)} ({'; '.join(notes)})."


_EPILOG = "\n".join(
    [
        f"folder layout: {' and '.join(f'{s.task.upper()}_FILE' for s in SPLITS)} (JSONL, any may be absent) "
        "with images under --image-root.",
        *(_columns(split) for split in SPLITS),
        f"Rename columns with {' and '.join(f'--{s.task}-field NAME=COLUMN' for s in SPLITS)}.",
    ]
)
MAX_LISTED = 20  # failed items printed; results.json has them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-bench",
        description="Score a FIRM-Bench style benchmark through a critic and report MAE against the human scores.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("folder", type=Path, help="Benchmark folder.")
    for split in SPLITS:
        name = f"{split.task}.jsonl"
        help_text = f"{split.noun.capitalize()} items, relative to the folder (default: {name})."
        add(f"--{split.task}-file", default=name, help=help_text)
    add("--image-root", type=Path, help="Folder image paths are relative to (default: the benchmark folder).")
    for split in SPLITS:
        help_text = f"Column holding a field of the {split.noun} items."
        add(f"--{split.task}-field", action="append", metavar="NAME=COLUMN", help=help_text)
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
    paths = []
    for split in SPLITS:
        path = args.folder / getattr(args, f"{split.task}_file")
        paths.append(str(path))
        if path.exists():
            fields = parse_field_map(getattr(args, f"{split.task}_field"), split.columns)
            items += load_split(split, path, fields, root, args.id_field)
    if not items:
        raise ManifestError(f"no benchmark items: none of {', '.join(paths)} exists or holds any")
    return items


async def predict(args: argparse.Namespace, items: list[BenchItem]) -> tuple[BenchScores, str]:
    """Predictions and the name of the model that made them."""
    settings: dict[str, Any] = {"timeout_s": args.timeout_s, "strict": False}  # a failed item fails alone
    if args.api_key:
        settings["api_key"] = args.api_key
    if args.engine_args is None:
        return await _predict(AsyncRewardClient(args.url.split(","), **settings), args, items)
    # In process: firm-serve's own app, reached through an ASGI transport instead of a socket, so
    # requests are validated, limited and answered exactly as a served run's.
    from server.app import create_app
    from server.cli import load_settings

    app = create_app(load_settings(shlex.split(args.engine_args)))
    await app.state.service.start()  # the ASGI transport runs no lifespan: load the critics here
    try:
        client = AsyncRewardClient(
            "http://firm-serve.in-process", http_transport=httpx.ASGITransport(app=app), **settings
        )
        return await _predict(client, args, items)
    finally:
        await app.state.service.close()


async def _predict(
    client: AsyncRewardClient, args: argparse.Namespace, items: list[BenchItem]
) -> tuple[BenchScores, str]:
    async with client:
        cards = await _served_models(client)
        scores = await score_items(client, items, args.score_mode, served={c.task for c in cards})
    return scores, _model_name(cards)


async def _served_models(client: AsyncRewardClient) -> list[ModelCard]:
    """The server's critics. Asked first, so a server that is down or refuses the key stops the run at once."""
    try:
        return (await client.models()).models
    except FirmError as exc:
        raise BenchAborted(str(exc)) from exc
    except httpx.HTTPStatusError as exc:
        raise BenchAborted(f"GET /v1/models: HTTP {exc.response.status_code}: {exc.response.text[:300]}") from exc


def _model_name(cards: Sequence[ModelCard]) -> str:
    return " + ".join(dict.fromkeys(card.name for card in cards))


def write_results(args: argparse.Namespace, items: list[BenchItem], scores: BenchScores, model: str) -> str:
    """Write results.json, table.txt and confusion.png over the tasks that were not skipped; the table."""
    kept = [(i, p) for i, p in zip(items, scores.predictions, strict=True) if i.task not in scores.skipped]
    kept_items, predictions = [i for i, _ in kept], [p for _, p in kept]
    figures = metrics(kept_items, predictions)
    label = args.label or model
    text = table(figures, label)
    args.output.mkdir(parents=True, exist_ok=True)
    matrices = confusion_matrices(kept_items, predictions)
    panels = draw_confusions(matrices, args.output / "confusion.png")
    results = {
        "label": label,
        "model": model,
        "score_mode": args.score_mode,
        "mae": figures,
        "skipped": scores.skipped,
        "aborted": scores.aborted,
        "confusion": matrices,
        "confusion_panels": panels,
        "items": per_item(kept_items, predictions),
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.output / "table.txt").write_text(text + "\n", encoding="utf-8")
    return text


def report(args: argparse.Namespace, items: list[BenchItem], scores: BenchScores, model: str) -> int:
    """Print and write what was scored, and why the rest was not; the exit status."""
    for task, why in scores.skipped.items():
        print(f"firm-bench: the {task} items are skipped: {why}", file=sys.stderr)
    if all(item.task in scores.skipped for item in items):
        print("firm-bench: nothing to score: the critic serves none of the benchmark's tasks", file=sys.stderr)
        return 2
    if scores.aborted is None or any(p.value is not None for p in scores.predictions):
        print(write_results(args, items, scores, model))
    pairs = zip(items, scores.predictions, strict=True)
    failed = [(i.id, p.error) for i, p in pairs if p.value is None and i.task not in scores.skipped]
    for item_id, error in failed[:MAX_LISTED]:
        print(f"firm-bench: {item_id} failed: {error}", file=sys.stderr)
    if len(failed) > MAX_LISTED:
        print(f"firm-bench: {len(failed) - MAX_LISTED} more items failed (results.json lists them)", file=sys.stderr)
    if scores.aborted is not None:
        print(f"firm-bench: stopped early: {scores.aborted}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status."""
    args = build_parser().parse_args(argv)
    try:
        items = load_items(args)
        scores, model = asyncio.run(predict(args, items))
    except (ManifestError, ValueError, OSError, BenchAborted) as exc:
        print(f"firm-bench: {exc}", file=sys.stderr)
        return 2
    return report(args, items, scores, model)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
