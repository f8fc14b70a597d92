"""Command-line flags made from a pydantic-settings class; they live in `foundation.flags`, below every package."""

from foundation.flags import add_setting_flag, describe_errors, flag, parse_settings, settings_parser

__all__ = ["add_setting_flag", "describe_errors", "flag", "parse_settings", "settings_parser"]
