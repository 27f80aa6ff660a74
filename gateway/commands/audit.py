"""``gateway audit verify``: check the audit trail's hash chain."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.security.audit import trail_path, verify


def register(sub: Subparsers) -> None:
    audit = sub.add_parser("audit", help="the audit trail: who sent what, where it went")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    averify = needs_config(
        asub.add_parser(
            "verify",
            help="check the trail's hash chain; report the first edited or missing record",
            description="Read the audit trail (default: DATA_DIR/audit/audit.jsonl) and check "
            "every record's hash and its link to the one before. Exit 0 when intact; exit 1 "
            "with the first bad record and why (edited, missing, reordered, inserted, torn).",
        ),
        audit_verify,
    )
    averify.add_argument("file", nargs="?", type=Path, help="a trail file (default: the gateway's)")
    averify.add_argument(
        "--anchor",
        metavar="SEQ:HASH",
        help="a head recorded elsewhere (the audit.head log line at shutdown, or the syslog "
        "copy): also catches records cut off the end or a rewritten tail",
    )


def audit_verify(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    path = args.file or trail_path(cfg.data_dir)
    if not path.exists():
        print(f"{path}: no audit trail (the gateway writes it once it runs)", file=out)
        return 1
    anchor = None
    if args.anchor:
        seq, _, head = args.anchor.partition(":")
        if not seq.isdigit() or len(head) != 64:
            raise GatewayError("--anchor takes SEQ:HASH, e.g. 1234:9f86d08...")
        anchor = (int(seq), head)
    report = verify(path, anchor=anchor)
    if report.ok:
        print(f"{path}: OK, {report.records} records, hash chain intact", file=out)
        return 0
    print(
        f"{path}: TAMPERED OR DAMAGED after {report.records} good records: {report.reason}",
        file=out,
    )
    return 1
