"""`firm-score`: score one edit, one image, or a JSONL manifest of many, against a running server.

Exit status: 0 when every item got a reward, 1 when any item failed (a summary says which and
why), 2 for bad usage or a request the server refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clients import watch
from clients.adapters.inputs import INPUTS, Batch, TaskInputs, task_inputs
from clients.client import RewardClient
from clients.errors import FirmError
from clients.images import IMAGE_FORMATS
from clients.protocol import EditResult, GenResult
from clients.tasks import TASKS

BATCH = 64  # manifest items per client call; the client splits them into server-sized requests

_EPILOG = """\
manifest lines (paths are relative to the manifest's folder):
  edit: {"id": "a1", "source": "src/a1.png", "edited": "out/a1.png", "instruction": "Make the car red."}
  gen:  {"id": "g1", "image": "out/g1.png", "prompt": "a cat in a red hat", "requirement": "photorealistic"}

examples:
  firm-score edit --source a.png --edited b.png --instruction "Make the car red."
  firm-score gen --image cat.png --prompt "a cat in a red hat"
  firm-score manifest items.jsonl --task edit --output scores.csv --url http://critic:8000
  firm-score watch http://critic:8000         # the watch page's signals in the terminal

The server address and key can also come from FIRM_URL / FIRM_URLS and FIRM_API_KEY, the encoding
from FIRM_IMAGE_FORMAT and FIRM_JPEG_QUALITY. By default each image file is sent as the FIRM release's
trainers send their images, JPEG at quality 75, so the critic sees what it saw there; --image-format
PNG shows it the file's exact pixels.
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="server base URL(s), comma-separated (default: FIRM_URL or http://127.0.0.1:8000)"
    )
    common.add_argument("--api-key", help="bearer key (default: FIRM_API_KEY)")
    common.add_argument("--timeout", type=float, help="deadline of one call in seconds, retries included")
    common.add_argument(
        "--image-format",
        type=str.upper,
        choices=IMAGE_FORMATS,
        help="how each image is encoded for the server (default: FIRM_IMAGE_FORMAT or JPEG, as the release)",
    )
    common.add_argument(
        "--jpeg-quality", type=int, help="JPEG (and WebP) quality, 1-100 (default: FIRM_JPEG_QUALITY or 75)"
    )
    common.add_argument("--score-mode", choices=("argmax", "expected"), help="what feeds the reward")
    common.add_argument("--reasoning", action="store_true", help="include the judges' reasoning")
    parser = argparse.ArgumentParser(
        prog="firm-score",
        description="Score image edits (CME) or generated images (QMA) with a FIRM reward server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in INPUTS.values():  # one subcommand per task: its item's fields as flags
        one = commands.add_parser(entry.spec.name, parents=[common], help=f"score one item of {entry.spec.title}")
        for name in _image_fields(entry):
            one.add_argument(f"--{name}", type=Path, required=True, help=f"path of the item's {name} image")
        one.add_argument(f"--{entry.text}", required=True, help=f"the {entry.text} the image is judged against")
        if entry.requirement is not None:
            one.add_argument(f"--{entry.requirement}", help="an extra requirement the image must meet")
    manifest = commands.add_parser("manifest", parents=[common], help="score a JSONL manifest of many items")
    manifest.add_argument("path", type=Path, help="JSONL manifest (one item per line)")
    manifest.add_argument("--task", choices=tuple(TASKS), required=True)
    manifest.add_argument("--output", "-o", type=Path, help="results as .jsonl or .csv (default: JSONL on stdout)")
    manifest.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    watch.add_parser(commands)
    return parser


def _row(result: EditResult | GenResult) -> dict[str, Any]:
    """One flat record per item, for JSONL and CSV alike."""
    row: dict[str, Any] = {"id": result.id, "reward": result.reward}
    for name in (name for spec in TASKS.values() for name in spec.dimensions):
        if name in type(result).model_fields:
            dim = getattr(result, name)
            row[f"{name}_score"] = dim.score if dim else None
            row[f"{name}_expected"] = dim.expected if dim else None
            if dim and dim.reasoning:
                row[f"{name}_reasoning"] = dim.reasoning
    row["error_code"] = result.error.code if result.error else None
    row["error"] = result.error.message if result.error else None
    return row


def _image_fields(entry: TaskInputs) -> list[str]:
    """The item fields of a task that hold images, the source (if any) first."""
    return [name for name in (entry.source, entry.image) if name is not None]


def _read_manifest(path: Path, task: str) -> list[dict[str, Any]]:
    entry = task_inputs(task)
    keys = [*_image_fields(entry), entry.text]
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
        item.setdefault("id", str(number))
        for key in _image_fields(entry):
            if key in item:
                item[key] = path.parent / item[key]
                if not item[key].is_file():
                    raise ValueError(f"{path}:{number}: no such file {item[key]}")
        items.append(item)
    return items


def _score_batch(client: RewardClient, task: str, batch: list[dict[str, Any]], options: dict[str, Any]) -> list[Any]:
    entry = task_inputs(task)
    reply = entry.score(
        client,
        Batch(
            images=[item[entry.image] for item in batch],
            texts=[item[entry.text] for item in batch],
            sources=None if entry.source is None else [item[entry.source] for item in batch],
            requirements=None if entry.requirement is None else [item.get(entry.requirement) for item in batch],
            ids=[str(item["id"]) for item in batch],
            options=options,
        ),
    )
    return list(reply.results)


def _batches(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _write(rows: list[dict[str, Any]], output: Path | None) -> None:
    if output is not None and output.suffix.lower() == ".csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with output.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def _summary(results: Sequence[EditResult | GenResult]) -> str:
    scored = [r.reward for r in results if r.reward is not None]
    failures = Counter(r.error.code for r in results if r.error)
    mean = f", mean reward {sum(scored) / len(scored):.4f}" if scored else ""
    text = f"{len(results)} items: {len(scored)} scored, {len(results) - len(scored)} failed{mean}"
    if failures:
        text += " (" + ", ".join(f"{code}: {n}" for code, n in failures.most_common()) + ")"
    return text


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "watch":
        sys.exit(watch.main(args))
    options: dict[str, Any] = {"score_mode": args.score_mode, "return_reasoning": args.reasoning}
    try:
        with RewardClient(
            args.url,
            api_key=args.api_key,
            timeout_s=args.timeout,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
        ) as client:
            if args.command == "manifest":
                items = _read_manifest(args.path, args.task)
                results = _score_manifest(client, args.task, items, options, progress=not args.no_progress)
                _write([_row(r) for r in results], args.output)
            else:
                fields = task_inputs(args.command).keys
                batch = [{"id": "0", **{name: getattr(args, name) for name in fields}}]
                results = _score_batch(client, args.command, batch, options)
                print(json.dumps(results[0].model_dump(exclude_none=True), indent=2))
    except (FirmError, OSError, ValueError) as exc:  # refused requests, unreadable files, bad arguments
        print(f"firm-score: {exc}", file=sys.stderr)
        sys.exit(2)
    print(_summary(results), file=sys.stderr)
    sys.exit(0 if all(r.reward is not None for r in results) else 1)


def _score_manifest(
    client: RewardClient, task: str, items: list[dict[str, Any]], options: dict[str, Any], progress: bool
) -> list[Any]:
    from tqdm import tqdm

    results: list[Any] = []
    failed = 0
    with tqdm(total=len(items), unit="item", disable=not progress, file=sys.stderr) as bar:
        for batch in _batches(items):
            done = _score_batch(client, task, batch, options)
            failed += sum(r.reward is None for r in done)
            results += done
            bar.update(len(batch))
            bar.set_postfix(failed=failed)
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
