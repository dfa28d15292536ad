"""Argument types shared by the command lines (``python -m appliance``, ``python -m training``)."""

from __future__ import annotations

import argparse

from appliance.candles import parse_time


def cli_time(value: str) -> int:
    """An argparse type: epoch seconds from ISO-8601 or epoch digits, or a usage error saying why."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
