"""``gateway check-config``: validate a config file."""

from __future__ import annotations

import argparse
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config


def register(sub: Subparsers) -> None:
    needs_config(
        sub.add_parser(
            "check-config",
            help="validate a config file",
            description="Validate the config. Exit 0 when valid; exit 1 and one line per error "
            "(FILE:LINE: path.to.key: message) otherwise.",
        ),
        check_config,
    )


def check_config(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    """The config loaded (an invalid one raised ConfigError before): say what it holds."""
    print(
        f"{args.config}: OK ({len(cfg.dicom.allowed_callers)} DICOM callers, "
        f"{len(cfg.hl7.allowed_senders)} HL7 senders, {len(cfg.destinations)} destinations, "
        f"{len(cfg.models)} models, {len(cfg.routes)} routes)",
        file=out,
    )
    return 0
