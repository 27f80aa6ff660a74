"""``gateway run``: start everything, drain on SIGTERM."""

from __future__ import annotations

import argparse
from typing import TextIO

from gateway.app import Gateway
from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.observability.logging import configure_logging


def register(sub: Subparsers) -> None:
    run = needs_config(
        sub.add_parser(
            "run",
            help="start the DICOM SCP, the MLLP listener and the health/metrics server",
            description="Start everything. SIGTERM (or Ctrl-C) stops accepting, finishes what is "
            "in flight and exits.",
        ),
        run_gateway,
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_gateway(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    configure_logging(args.log_level)
    gw = Gateway(cfg)
    gw.run_forever()
    return 0
