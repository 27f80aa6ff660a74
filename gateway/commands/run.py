"""``gateway run``: start the gateway's processes (gateway.supervisor), drain on SIGTERM."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.supervisor import ROLES, run_child, run_supervisor


def register(sub: Subparsers) -> None:
    run = needs_config(
        sub.add_parser(
            "run",
            help="start the DICOM SCP, the MLLP listener, the workers and the health/metrics "
            "server",
            description="Start the gateway: ingest.processes listener processes (DICOM and "
            "MLLP, sharing the ports) and workers.processes worker processes (routing, "
            "models, results, delivery), supervised: one that exits is started again. "
            "SIGTERM (or Ctrl-C) stops accepting, finishes what is in flight and exits; "
            "SIGHUP reloads the config.",
        ),
        run_gateway,
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="this node's part: the listeners (ingest), the workers (worker), or both "
        "(all, the default)",
    )
    # how the supervisor starts its children; not for people
    run.add_argument("--child", choices=["ingest", "worker"], help=argparse.SUPPRESS)
    run.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--ports", default="{}", help=argparse.SUPPRESS)
    run.add_argument("--control-fd", type=int, default=-1, help=argparse.SUPPRESS)
    run.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)


def run_gateway(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    if args.child is not None:
        return run_child(
            cfg,
            args.child,
            args.index,
            {str(k): int(v) for k, v in json.loads(args.ports).items()},
            args.control_fd,
            args.parent_pid,
            args.log_level,
        )
    return run_supervisor(cfg, args.role, args.log_level)
