"""`firm-serve`: start the FIRM reward server.

Every flag mirrors a field of `server.settings.Settings` (and its FIRM_* environment variable),
so the command line, the environment and the docs cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError

from server.logs import configure_logging
from server.settings import Settings

_EPILOG = """\
examples:
  firm-serve                                  # both critics from the hub, on 127.0.0.1:8000
  firm-serve --gen-model none --port 9000     # editing critic only
  firm-serve --tiny                           # tiny random critic built locally, for smoke tests

Every flag can also be set as an environment variable: --max-batch-size 32 is FIRM_MAX_BATCH_SIZE=32.
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(annotation: object) -> str:
    text = str(annotation)
    for kind, metavar in (("int", "N"), ("float", "X"), ("Path", "PATH")):
        if kind in text:
            return metavar
    return "TEXT"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm-serve",
        description="Serve the FIRM reward models (FIRM-Edit: execution + consistency -> CME reward; "
        "FIRM-Gen: instruction following + quality -> QMA reward) over HTTP for RL training.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags leave env vars and defaults in charge
    )
    for name, field in Settings.model_fields.items():
        env = f"FIRM_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} [env {env}; default {default}]"
        annotation = field.annotation
        choices = get_args(annotation) if getattr(annotation, "__origin__", None) is not None else ()
        if annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, help=help_text)
        elif choices and all(isinstance(c, str) for c in choices):
            parser.add_argument(_flag(name), choices=choices, help=help_text)
        else:
            parser.add_argument(_flag(name), metavar=_metavar(annotation), help=help_text)
    return parser


def _flag_of(loc: tuple[int | str, ...]) -> str:
    return f"{_flag('_'.join(str(p) for p in loc))}: " if loc else ""


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    args: dict[str, Any] = vars(build_parser().parse_args(argv))
    return Settings(**args)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        problems = "\n".join(f"  {_flag_of(e['loc'])}{e['msg']}" for e in exc.errors())
        sys.exit(f"firm-serve: invalid settings:\n{problems}")
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("firm-serve")
    from server.app import create_app
    from server.judges import TemplateError
    from server.shutdown import DrainingServer

    try:
        app = create_app(settings)
    except (TemplateError, ValueError, OSError) as exc:
        sys.exit(f"firm-serve: {exc}")
    if settings.insecure and not settings.key_ring().enabled:
        log.warning("serving %s WITHOUT API keys (--insecure): anyone who can reach it can score", settings.host)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    DrainingServer.serve_app(app, settings)


if __name__ == "__main__":  # pragma: no cover
    main()
