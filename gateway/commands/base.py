"""What every command module shares: how a subcommand takes its config file, and the two
kinds of handler that :func:`gateway.cli.main` calls."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, TypeAlias

from gateway.config import DEFAULT_CONFIG, Config

__all__ = ["ConfigHandler", "PlainHandler", "Subparsers", "needs_config", "plain", "utc_date"]

#: A handler that works on the loaded config (``-c/--config``): returns the exit status.
ConfigHandler: TypeAlias = Callable[[Config, argparse.Namespace, TextIO], int]
#: A handler that needs no config.
PlainHandler: TypeAlias = Callable[[argparse.Namespace, TextIO], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def needs_config(sp: argparse.ArgumentParser, handler: ConfigHandler) -> argparse.ArgumentParser:
    """Give *sp* the ``-c/--config`` option; the CLI loads that file and calls *handler*
    with it."""
    sp.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"config file (default: {DEFAULT_CONFIG})",
    )
    sp.set_defaults(func=handler, needs_config=True)
    return sp


def plain(sp: argparse.ArgumentParser, handler: PlainHandler) -> argparse.ArgumentParser:
    """*sp* runs *handler* without reading a config."""
    sp.set_defaults(func=handler, needs_config=False)
    return sp


def utc_date(text: str) -> float:
    """An argument type: YYYY-MM-DD or an ISO 8601 date and time (UTC unless it says
    otherwise), as a POSIX time."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
