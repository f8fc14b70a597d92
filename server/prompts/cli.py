"""`firm-serve prompts pull|show`: fill the prompt cache ahead of time, and see what a judge is sent.

Both read the same settings as the server (flags or FIRM_* variables), so `show` prints exactly
the text a served call carries, for the models and prompt set the server would use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from foundation.flags import add_setting_flag, describe_errors
from server.judges import JUDGES
from server.prompts.release import PromptSource
from server.prompts.serving import released_prompts, task_judges
from server.settings import Settings
from server.tasks import SERVER_TASKS

# the settings that decide which text each judge is sent, and with what budget
_SHARED = (
    "prompts",
    "prompt_source",
    "allow_prompt_drift",
    "cache_dir",
    "tiny",
    *(f"{task.name}_{setting}" for task in SERVER_TASKS.values() for setting in ("model", "max_new_tokens")),
    *(f"{judge}_template" for task in SERVER_TASKS.values() for judge in task.judges),
)
_EPILOG = """\
examples:
  firm-serve prompts pull                                   # cache the release's prompt files (needs network)
  firm-serve prompts pull --prompt-source /src/FIRM-Reward  # verify and use a local checkout instead
  firm-serve prompts pull --to ./firm-prompts               # a verified copy for an air-gapped box
  firm-serve prompts show --instruction "Make the car red."
  firm-serve prompts show --judge gen_instruction_following --prompt "a red car" --requirement "no people"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-serve prompts",
        description="The judges' prompts: where they come from, their digests, and the exact text a call carries.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="Fetch and verify the release's prompt files into the cache.")
    show = commands.add_parser("show", help="Print each judge's prompt source, digest and rendered text.")
    for sub in (pull, show):
        for name in _SHARED:
            add_setting_flag(sub, Settings, name)
    pull.add_argument(
        "--to",
        type=Path,
        help="Also write the verified files, in the release's layout, into this folder: a copy to carry to an "
        "air-gapped box or bake into an image, and use there as --prompt-source.",
    )
    show.add_argument("--judge", action="append", choices=list(JUDGES), help="Only this judge (repeatable).")
    for task in SERVER_TASKS.values():
        show.add_argument(
            f"--{task.text_field}", default="", help=f"The {task.spec.title} {task.text_field} to render."
        )
    show.add_argument("--requirement", default=None, help="The additional requirement (absent: empty).")
    show.add_argument("--json", action="store_true", help="One JSON object per judge instead of text.")
    return parser


def _pull(settings: Settings, to: Path | None) -> int:
    source = PromptSource(settings.prompt_source, settings.cache_dir, allow_drift=settings.allow_prompt_drift)
    for fetched in source.pull():
        state = "verified" if fetched.verified else "DRIFT (allowed)"
        print(f"{fetched.path}  sha256 {fetched.sha256}  {state}  from {fetched.location}")
        if to is not None:
            (to / fetched.path).parent.mkdir(parents=True, exist_ok=True)
            (to / fetched.path).write_text(fetched.text, encoding="utf-8")
    if to is not None:
        print(f"written in the release's layout to {to} (use it as --prompt-source)")
    print(f"cached in {source.cache}" if source.cache.exists() else "read from the local source (nothing to cache)")
    return 0


def _show(settings: Settings, args: argparse.Namespace) -> int:
    released = released_prompts(settings)
    wanted = set(args.judge or JUDGES)
    for name in settings.enabled_tasks():
        task, model = SERVER_TASKS[name], settings.served_name(name)  # the tiny critic gets our own prompts
        if not wanted & set(task.judges):
            continue
        fields = task.template_fields(getattr(args, task.text_field), args.requirement)
        for judge in task_judges(settings, name, model, released):
            if judge.name not in wanted:
                continue
            text = judge.render(**fields)
            entry = {
                "judge": judge.name,
                "model": model,
                "source": judge.origin,
                "sha256": judge.sha256,
                "verified": judge.verified,
                "max_new_tokens": judge.max_new_tokens,
                "text": text,
            }
            if args.json:
                print(json.dumps(entry))
            else:
                check = {True: "verified", False: "DRIFT (allowed)", None: "not from the release"}[judge.verified]
                print(f"=== {judge.name} ({model})\nsource: {judge.origin}\nsha256: {judge.sha256} ({check})")
                print(f"max_new_tokens: {judge.max_new_tokens}\n--- text ---\n{text}\n--- end ---")
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in _SHARED if hasattr(args, name)}
    try:
        settings = Settings(**given, host="127.0.0.1")  # nothing is served: a public FIRM_HOST needs no keys here
    except ValidationError as exc:
        sys.exit(f"firm-serve prompts: invalid settings:\n{describe_errors(exc)}")
    try:
        return _pull(settings, args.to) if args.command == "pull" else _show(settings, args)
    except (ValueError, OSError) as exc:  # a prompt source, template or settings error, said plainly
        sys.exit(f"firm-serve prompts: {exc}")
