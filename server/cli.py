"""`firm-serve`: start the FIRM reward server.

Every flag mirrors a field of `server.settings.Settings` (and its FIRM_* environment variable),
so the command line, the environment and the docs cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from foundation.flags import describe_errors, parse_settings, settings_parser
from server.engines import BUILT_IN, engine_class, resolve_engine_name
from server.logs import configure_logging
from server.settings import Settings
from server.torch_stack import torchvision_problem

_EPILOG = """\
examples:
  firm-serve                                  # both critics from the hub, on 127.0.0.1:8000
  firm-serve --gen-model none --port 9000     # editing critic only
  firm-serve --tiny                           # tiny random critic built locally, for smoke tests
  firm-serve prompts pull                     # cache the release's prompt files for offline starts
  firm-serve prompts show --instruction "Make the car red."   # the exact text each judge is sent
  firm-serve check --gen-model none           # what firm-serve would do with these settings; loads nothing

Every flag can also be set as an environment variable: --max-batch-size 32 is FIRM_MAX_BATCH_SIZE=32.
"""


_CHECK_DESCRIPTION = (
    "Say what `firm-serve` would do with the same flags, loading nothing: engine, device, prompts, each model's "
    "source and whether it is cached, the memory estimate, keys and bind address. Exits 1 when firm-serve would "
    "not serve everything, 2 for settings it would refuse or a torchvision built for another torch. It takes "
    "every flag firm-serve takes."
)
_CHECK_EPILOG = """\
examples:
  firm-serve check                            # the defaults: both critics from the hub
  firm-serve check --engine vllm --gen-model none
  firm-serve check --tiny                     # builds the tiny critic on its first run
"""


def build_parser(checking: bool = False) -> argparse.ArgumentParser:
    """`firm-serve`'s parser, or with `checking` the one of `firm-serve check`, which takes the same flags."""
    return settings_parser(
        Settings,
        prog="firm-serve check" if checking else "firm-serve",
        description=_CHECK_DESCRIPTION
        if checking
        else "Serve the FIRM reward models (FIRM-Edit: execution + consistency -> CME reward; "
        "FIRM-Gen: instruction following + quality -> QMA reward) over HTTP for RL training.",
        epilog=_CHECK_EPILOG if checking else _EPILOG,
    )


def load_settings(argv: Sequence[str] | None = None, *, checking: bool = False) -> Settings:
    return parse_settings(build_parser(checking), Settings, argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prompts"]:
        from server.prompts.cli import main as prompts_main

        sys.exit(prompts_main(argv[1:]))
    checking = argv[:1] == ["check"]
    try:
        settings = load_settings(argv[1:] if checking else argv, checking=checking)
    except ValidationError as exc:
        print(f"firm-serve: invalid settings:\n{describe_errors(exc)}", file=sys.stderr)
        sys.exit(2)  # as argparse exits for a flag it cannot parse
    engine = resolve_engine_name(settings.engine)[0]  # a plug-in is not checked: it may need neither package
    local = settings.tiny or (engine in BUILT_IN and engine_class(engine).loads_checkpoint)
    if local and (problem := torchvision_problem()) is not None:
        print(f"firm-serve: cannot {'check' if checking else 'start'}: {problem}", file=sys.stderr)
        sys.exit(2)  # before any critic loads, rather than a processor's import error from deep inside it
    if checking:
        from server.check import main as check_main

        configure_logging("warning", "text")  # library warnings on stderr, once; the findings on stdout
        logging.getLogger("server.tiny").setLevel(logging.INFO)  # a first --tiny check builds it: show its progress
        sys.exit(check_main(settings))
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("firm-serve")
    from server.app import create_app
    from server.judges import TemplateError
    from server.prompts.release import PromptSourceError
    from server.shutdown import DrainingServer
    from server.tasks import SERVER_TASKS

    try:
        app = create_app(settings)
    except PromptSourceError as exc:
        log.error("cannot start: the judges' prompts from the FIRM release cannot be had: %s", exc)
        sys.exit(2)
    except (TemplateError, ValueError, OSError) as exc:
        log.error("cannot start: %s", exc)  # one line, in the log's own format
        sys.exit(2)
    if "FIRM_MAX_NEW_TOKENS" in os.environ:
        budgets = ", ".join(f"FIRM_{t.upper()}_MAX_NEW_TOKENS (now {settings.max_new_tokens(t)})" for t in SERVER_TASKS)
        log.warning("FIRM_MAX_NEW_TOKENS is no longer read: the budgets are %s", budgets)
    if settings.insecure and not settings.key_ring().enabled:
        log.warning("serving %s WITHOUT API keys (--insecure): anyone who can reach it can score", settings.host)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    DrainingServer.serve_app(app, settings)
    if abandoned := app.state.service.lifecycle.abandoned:
        # their threads (a library's download pool among them) would hold the exit until they finish
        log.info("exiting without waiting for the %s", " and the ".join(abandoned))
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
