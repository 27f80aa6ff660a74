"""``gateway purge``: one retention pass now, recorded in the audit trail."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.security.audit import AuditLog, records, trail_path
from gateway.services.retention import audit_entry, purge, purge_findings
from gateway.store.backend import database_label, database_password, queue_exists
from gateway.store.store import Store


def register(sub: Subparsers) -> None:
    p = needs_config(
        sub.add_parser(
            "purge",
            help="delete what the gateway is done with (retention), now",
            description="Delete complete studies and HL7 messages received more than DAYS "
            "ago whose every job is done, their results and spool files, and data keys no "
            "object uses any more. Anything with a waiting, running or dead job is kept. "
            "The running gateway does this every hour when gateway.retention_days is set; "
            "this command does one pass now (safe beside a running gateway) and records it "
            "in the audit trail. The findings store's rows go after findings.retention_days.",
        ),
        purge_command,
    )
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="retention in days (default: gateway.retention_days from the config)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def purge_command(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    days = args.older_than if args.older_than is not None else cfg.gateway.retention_days
    if days is None:
        raise GatewayError(
            f"no retention: set gateway.retention_days in {cfg.source} or pass --older-than DAYS"
        )
    if days < 0:
        raise GatewayError("--older-than takes a number of days >= 0")
    database = cfg.gateway.database
    if not queue_exists(cfg.data_dir, database, database_password(cfg)):
        where = database_label(database, cfg.data_dir)
        print(f"{where}: no gateway data here, nothing to purge", file=out)
        return 0
    store = Store.for_config(cfg, create=False)
    try:
        report = purge(store, days, dry_run=args.dry_run)
        if cfg.findings.retention_days is not None:  # the findings store's own retention
            report.findings_runs = purge_findings(
                store, cfg.findings.retention_days, dry_run=args.dry_run
            )
    finally:
        store.close()
    if not args.dry_run:
        with AuditLog.open(trail_path(cfg.data_dir)) as trail:  # safe beside a running gateway
            trail.write(audit_entry(report, records.cli_user()))
    if args.json:
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
        return 0
    d = report.as_dict()
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb}: {d['studies']} studies and {d['messages']} messages received before "
        f"{d['cutoff']}"
        + (f" ({d['envelopes']} stored objects)" if d["envelopes"] else "")
        + f", {d['spool_files']} spool files ({d['spool_bytes'] / 1e6:.1f} MB)"
        + ("" if args.dry_run else f", {len(d['keys_destroyed'])} data keys destroyed"),
        file=out,
    )
    if cfg.findings.retention_days is not None:
        print(
            f"findings store: {verb} {report.findings_runs} model runs inferred more than "
            f"{cfg.findings.retention_days:g} days ago (findings.retention_days)",
            file=out,
        )
    if report.kept:
        print(
            f"kept: {report.kept} old enough but with a job waiting, running or dead "
            "(see gateway queue status / queue dead)",
            file=out,
        )
    return 0
