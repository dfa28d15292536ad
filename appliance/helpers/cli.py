"""What the command lines share (``python -m appliance``, ``python -m training``, ``python -m webhook``):
argument types, and help that shows every default and the environment variables a command reads."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from collections.abc import Iterable
from typing import Any

from pydantic_settings import BaseSettings

from appliance.candles import parse_time


def cli_time(value: str) -> int:
    """An argparse type: epoch seconds from ISO-8601 or epoch digits, or a usage error saying why."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class HelpFormatter(argparse.HelpFormatter):
    """Plain text: each line of a description wrapped on its own (indented lines, tables, kept as they
    are), and each option's default (or 'required') shown."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            line if not line or line.startswith(" ") else textwrap.fill(
                line, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
            for line in text.splitlines()
        )  # fmt: skip

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            return f"{text} (default: {shown(action.default).replace('%', '%%')})".strip()
        return text


def shown(value: Any) -> str:
    """A default as a person would type it: tuples comma-separated, nothing as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def settings_help(settings: type[BaseSettings], names: Iterable[str] | None = None) -> str:
    """The environment variables a command reads (all of ``settings`` unless ``names``), for its --help:
    generated from the settings class, so the help can never name a variable that does not exist."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    fields = settings.model_fields
    rows = []
    for name in names if names is not None else fields:
        field = fields[name]
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        default = "required" if field.is_required() else f"default: {shown(value)}"
        rows.append(((prefix + name).upper(), f"{field.description or ''} ({default})".strip()))
    column = max(len(variable) for variable, _ in rows) + 4
    width = min(100, shutil.get_terminal_size().columns - 2)  # as wide as argparse's own text
    lines = []
    for variable, text in rows:
        wrapped = textwrap.wrap(text, max(40, width - column), break_on_hyphens=False, break_long_words=False)
        lines.append(f"  {variable:<{column - 2}}{wrapped[0]}")
        lines += [" " * column + more for more in wrapped[1:]]
    return "environment variables:\n" + "\n".join(lines)
