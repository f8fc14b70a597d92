"""`firm-curate`: build fine-tuning records for a FIRM critic from raw pairs with teacher models.

    firm-curate edit pairs.jsonl --output edit.jsonl --base-url http://vlm:8000/v1 --model Qwen/Qwen3-VL-32B-Instruct
    firm-curate gen prompts.jsonl --output gen_records.jsonl --plan-model gpt-4.1 --check-model gpt-4.1

Exit status: 0 when every item is in the output, 1 when some failed (they are listed in the
summary and retried by the next run), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.retry import RetryPolicy
from server.judges import JUDGES, TemplateError
from server.tasks import SERVER_TASKS
from training.curation.chat import ChatClient, Endpoint
from training.curation.common import Context, Pipeline, PipelineKind
from training.curation.edit import EditPipeline
from training.curation.gen import GenPipeline
from training.curation.prompts import PromptError, load_prompt
from training.curation.runner import RunReport, run_pipeline
from training.curation.store import RecordStore
from training.manifest import ManifestError, parse_field_map, read_manifest
from training.prompt_set import add_prompt_flags, released_prompts
from training.records import SERVED_PIXEL_BUDGET

# firm-curate's pipelines, one subcommand each, by the task whose critic their records train.
PIPELINES: dict[str, PipelineKind] = {kind.task: kind for kind in (EditPipeline, GenPipeline)}
_EPILOG = """\
input: a JSONL file, one item per line: {columns} (? marks an optional one).
Image paths are relative to --image-root. Rename columns with --field, e.g. --field
{first}=original_path. Items without an id get one from their content. Run the same command
again to resume: done items are skipped.
"""


def _epilog(kind: PipelineKind) -> str:
    """The subcommand's input format, from the columns its pipeline reads.

    >>> print(_epilog(GenPipeline).splitlines()[0])
    input: a JSONL file, one item per line: {"id", "image", "prompt", "requirement"?} (? marks an optional one).
    """
    names = ", ".join(f'"{f}"' + ("" if f in kind.required else "?") for f in kind.fields)
    return _EPILOG.format(columns=f'{{"id", {names}}}', first=kind.fields[0])


def _add_common(parser: argparse.ArgumentParser, kind: PipelineKind) -> None:
    _add_input(parser, kind)
    _add_endpoints(parser, kind)
    _add_calls(parser)
    _add_records(parser, kind)
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def _add_input(parser: argparse.ArgumentParser, kind: PipelineKind) -> None:
    add = parser.add_argument
    add("input", type=Path, help="JSONL manifest of the items to curate.")
    add("--output", type=Path, required=True, help="JSONL file of records (appended; resumable).")
    add("--summary", type=Path, help="Summary JSON (default: OUTPUT with .summary.json).")
    add("--image-root", type=Path, help="Folder image paths are relative to (default: the input's).")
    add("--field", action="append", metavar="NAME=COLUMN", help=f"Read NAME ({', '.join(kind.fields)}) from COLUMN.")
    add("--id-field", default="id", help="Column holding the item id (default: id).")
    add("--limit", type=int, help="Curate only the first N items of the input.")


def _add_endpoints(parser: argparse.ArgumentParser, kind: PipelineKind) -> None:
    """The shared endpoint flags, and one group per step overriding them."""
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="OpenAI-compatible base URL for every step, e.g. http://host:8000/v1 [env OPENAI_BASE_URL].",
    )
    parser.add_argument("--model", help="Model name for every step.")
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key for every step [env OPENAI_API_KEY]."
    )
    for step, role in kind.steps:
        group = parser.add_argument_group(f"step '{step}'", f"The {role}; each flag overrides the shared one.")
        group.add_argument(f"--{step}-base-url", help=f"Base URL for the {step} step.")
        group.add_argument(f"--{step}-model", help=f"Model for the {step} step.")
        group.add_argument(f"--{step}-api-key", help=f"Bearer key for the {step} step.")
        group.add_argument(
            f"--{step}-prompt", type=Path, help=f"File replacing the built-in {step} prompt (same placeholders)."
        )


def _add_calls(parser: argparse.ArgumentParser) -> None:
    """How the teachers are called: concurrency, sampling, time limits, retries."""
    add = parser.add_argument
    add("--concurrency", type=int, default=16, help="Items curated at once (default: 16).")
    add("--temperature", type=float, default=0.0, help="Sampling temperature of the teachers (default: 0).")
    add("--max-tokens", type=int, default=1024, help="Most tokens a teacher may write per call (default: 1024).")
    add("--timeout-s", type=float, default=300.0, help="Time limit of one call (default: 300).")
    add("--max-retries", type=int, default=4, help="Retries of a failed call, with backoff (default: 4).")
    add("--backoff-s", type=float, default=1.0, help="First retry wait, doubled each retry (default: 1).")


def _add_records(parser: argparse.ArgumentParser, kind: PipelineKind) -> None:
    """What the records hold: image size, answer length, the judge templates they are rendered with."""
    add = parser.add_argument
    served = SERVER_TASKS[kind.task]
    add(
        "--image-pixel-budget",
        type=int,
        default=SERVED_PIXEL_BUDGET,
        help=f"Images sent to teachers are downscaled to this many pixels, as firm-serve does (default: "
        f"{SERVED_PIXEL_BUDGET}).",
    )
    add(
        "--max-answer-chars",
        type=int,
        default=None,
        help=f"Longest critic answer kept; a longer one fails its item. The served critic writes at most "
        f"{served.max_new_tokens} tokens for a judge of {served.spec.title}; the default, {kind.max_answer_chars} "
        "characters of English, stays under it with room for wordier text, and firm-train checks the exact "
        "token count.",
    )
    add_prompt_flags(parser, "The critic's prompt set the records are rendered with; train with the same")
    add(
        "--template",
        action="append",
        metavar="JUDGE=FILE",
        help="Render records with your own judge template, as firm-serve would with the same file "
        f"({', '.join(JUDGES)}).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-curate",
        description="Curate supervised fine-tuning records for a FIRM critic with OpenAI-compatible teacher models. "
        "Records are rendered with the server's own judge prompts.",
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    for task, kind in PIPELINES.items():
        sub = tasks.add_parser(
            task,
            help=kind.summary,
            description=kind.summary,
            epilog=_epilog(kind),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(sub, kind)
    return parser


def _client(args: argparse.Namespace, step: str) -> ChatClient:
    base_url = getattr(args, f"{step}_base_url") or args.base_url
    model = getattr(args, f"{step}_model") or args.model
    if not base_url or not model:
        raise ValueError(
            f"step '{step}' needs a base URL and a model (--{step}-base-url/--base-url, --{step}-model/--model)"
        )
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"step '{step}': the base URL must start with http:// or https://, got {base_url!r}")
    endpoint = Endpoint(
        base_url, model, getattr(args, f"{step}_api_key") or args.api_key, args.temperature, args.max_tokens
    )
    retry = RetryPolicy(max_attempts=args.max_retries + 1, backoff_s=args.backoff_s)
    return ChatClient(endpoint, concurrency=args.concurrency, timeout_s=args.timeout_s, retry=retry)


def _templates(pairs: Sequence[str] | None) -> dict[str, Path | None]:
    templates: dict[str, Path | None] = {}
    for pair in pairs or ():
        name, sep, path = pair.partition("=")
        if not sep or name not in JUDGES:
            raise ValueError(f"--template wants JUDGE=FILE with JUDGE one of {', '.join(JUDGES)}, got {pair!r}")
        templates[name] = Path(path)
    return templates


def build_pipeline(args: argparse.Namespace) -> Pipeline:
    kind = PIPELINES[args.task]
    context = Context(
        image_root=args.image_root or args.input.parent,
        records_dir=args.output.parent,
        pixel_budget=args.image_pixel_budget,
        max_answer_chars=args.max_answer_chars or kind.max_answer_chars,
        templates=_templates(args.template),
        prompts=args.prompts,
        released=released_prompts(args),
    )
    first, second = (step for step, _ in kind.steps)
    return kind(
        _client(args, first),
        _client(args, second),
        context,
        load_prompt(first, getattr(args, f"{first}_prompt")),
        load_prompt(second, getattr(args, f"{second}_prompt")),
    )


async def _curate(args: argparse.Namespace) -> RunReport:
    pipeline = build_pipeline(args)
    fields = parse_field_map(args.field, PIPELINES[args.task].fields)
    rows = list(read_manifest(args.input, fields, pipeline.required, args.id_field))[: args.limit]
    summary_path = args.summary or args.output.with_name(args.output.stem + ".summary.json")
    with RecordStore(args.output, len(pipeline.judges)) as store:
        report = await run_pipeline(
            pipeline, rows, store, summary_path, workers=args.concurrency, progress=not args.no_progress
        )
    summary = report.written_summary
    print(
        json.dumps(summary["items"] | {"tokens": summary["tokens"]["total"], "summary": str(summary_path)}),
        file=sys.stderr,
    )
    return report


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status (0 all done, 1 some items failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = asyncio.run(_curate(args))
    except (ValueError, ManifestError, PromptError, TemplateError, OSError) as exc:
        print(f"firm-curate: {exc}", file=sys.stderr)
        return 2
    return 1 if report.failures else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
