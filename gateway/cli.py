"""The ``gateway`` command.  Errors become a message and an exit code here, and only here:
0 = success, 1 = the operation failed (bad config, store error), 2 = bad usage.

The subcommands live in :mod:`gateway.commands`, each parser beside its handler; this
module builds the top-level parser from them, loads the config for those that take one,
and runs the handler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from gateway import __version__
from gateway.commands import COMMANDS
from gateway.errors import ConfigError, GatewayError
from gateway.preflight import load_config

EPILOG = """\
examples:
  gateway run                          start on config/gateway.yaml (loopback, SQLite)
  gateway check-config -c site.yaml    validate a config; errors as FILE:LINE: key: message
  gateway explain -v study/ oru.hl7    which route a study or message takes, and why
  gateway queue status                 what was received and what is waiting, per stage
  gateway queue dead                   jobs that gave up, with their last error
  gateway queue retry --all            replay every dead job
  gateway models list                  configured models: version, input, weights sha256
  gateway models run lung-nodules ct/  one model offline on a DICOM folder (or report.hl7)
  gateway keys rotate                  new data key for at-rest encryption
  gateway audit show --study UID       did a study arrive, and where did it go
  gateway audit verify                 check the audit trail's hash chain
  gateway certs dev /tmp/pki           a development CA, server and client certificates
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway",
        description="DICOM/HL7 integration gateway for hospital AI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args, sys.stdout)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gateway config-schema | head`
        return 0


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    """Run the chosen subcommand's handler, with its config loaded when it takes one."""
    if args.needs_config:
        return int(args.func(load_config(args.config), args, out))
    return int(args.func(args, out))


if __name__ == "__main__":
    raise SystemExit(main())
