"""Command-line flags made from a pydantic-settings class: one flag per field, its description as help.

The flag, the environment variable and the default shown in `--help` all come from the field, so
the command line, the environment and the docs cannot drift apart. A value that was renamed stays
accepted under its former spelling when the field says so (`FORMER_VALUES`); `renamed` maps it to
the current one with a warning.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic_settings import BaseSettings

FORMER_VALUES = "former_values"  # a field's json_schema_extra key: {former value: current value}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(annotation: object) -> str:
    text = str(annotation)
    for kind, metavar in (("int", "N"), ("float", "X"), ("Path", "PATH")):
        if kind in text:
            return metavar
    return "TEXT"


def _choices(annotation: object) -> tuple[object, ...]:
    """The values of a Literal field, also when it is optional (Literal[...] | None)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    literals = [a for a in get_args(annotation) if get_origin(a) is Literal]
    return get_args(literals[0]) if len(literals) == 1 else ()


class _Choices(tuple[object, ...]):
    """A flag's current values, which `--help` lists, that also contain its former ones, so argparse lets
    them through to the settings class that renames them."""

    former: frozenset[object]

    def __new__(cls, current: tuple[object, ...], former: Sequence[object] | Mapping[str, str]) -> _Choices:
        choices = super().__new__(cls, current)
        choices.former = frozenset(former)
        return choices

    def __contains__(self, value: object) -> bool:
        return value in self.former or super().__contains__(value)


def former_values(settings: type[BaseSettings], name: str) -> Mapping[str, str]:
    """The former spellings of a field's values that are still accepted, mapped to the current ones."""
    extra = settings.model_fields[name].json_schema_extra
    return extra.get(FORMER_VALUES, {}) if isinstance(extra, dict) else {}  # type: ignore[return-value]


def renamed(value: object, former: Mapping[str, str], name: str) -> object:
    """`value`, or its current spelling when it is a former one (with a FutureWarning, which users see)."""
    if isinstance(value, str) and value in former:
        warnings.warn(
            f"{name} {value!r} is now called {former[value]!r}; the old name will stop working",
            FutureWarning,
            stacklevel=2,
        )
        return former[value]
    return value


def settings_parser(
    settings: type[BaseSettings], *, prog: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """One flag per field; the environment variable shown is the settings class's own prefix plus the name."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags leave env vars and defaults in charge
    )
    for name in settings.model_fields:
        add_setting_flag(parser, settings, name)
    return parser


def add_setting_flag(parser: argparse.ArgumentParser, settings: type[BaseSettings], name: str) -> None:
    """The flag of one field: its description, environment variable and default as help; unset, it leaves
    the environment and the default in charge."""
    field = settings.model_fields[name]
    env = f"{settings.model_config.get('env_prefix', '')}{name.upper()}"
    if field.is_required():
        help_text = f"{field.description} [env {env}; required]"
    else:
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} [env {env}; default {default}]"
    annotation = field.annotation
    choices = _Choices(_choices(annotation), former_values(settings, name))
    unset = argparse.SUPPRESS
    if annotation is bool:
        parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=unset, help=help_text)
    elif choices and all(isinstance(c, str) for c in choices):
        parser.add_argument(flag(name), choices=choices, default=unset, help=help_text)
    else:
        parser.add_argument(flag(name), metavar=_metavar(annotation), default=unset, help=help_text)


def parse_settings(parser: argparse.ArgumentParser, settings: type[BaseSettings], argv: Sequence[str] | None) -> Any:
    """Flags over environment over defaults; raises pydantic's ValidationError (see `describe_errors`)."""
    return settings(**vars(parser.parse_args(argv)))


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid setting, named by its flag."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        where = f"{flag('_'.join(str(p) for p in loc))}: " if loc else ""
        lines.append(f"  {where}{error['msg']}")
    return "\n".join(lines)
