"""``gateway db status|migrate``: where the queue database's schema stands, and bringing
it up to this gateway's version (the gateway also does it when it starts)."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from gateway.commands.base import Subparsers, needs_config
from gateway.config import Config
from gateway.store.backend import migrate_database, schema_status


def register(sub: Subparsers) -> None:
    db = sub.add_parser("db", help="the queue database: schema version, migrations")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    status = needs_config(
        dsub.add_parser(
            "status",
            help="schema version of the queue database and pending migrations",
            description="Read the queue database's schema version without changing it. "
            "Exit 0 when it is up to date, 1 when migrations are pending or it was made by "
            "a newer gateway.",
        ),
        db_status,
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    needs_config(
        dsub.add_parser(
            "migrate",
            help="create the queue database, or upgrade it to this gateway's schema",
            description="Apply the pending migrations in one transaction (several nodes may "
            "run it at once: it is applied once). `gateway run` does the same at start.",
        ),
        db_migrate,
    )


def db_status(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    st = schema_status(cfg)
    if args.json:
        json.dump(
            {
                "engine": st.engine,
                "database": st.database,
                "schema": st.current,
                "gateway_schema": st.target,
                "pending": [] if st.newer else st.pending,
                "newer_than_gateway": st.newer,
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        print(f"queue database  {st.engine}: {st.database}", file=out)
        shown = "none (not created yet)" if st.current is None else str(st.current)
        print(f"schema          {shown}; this gateway's: {st.target}", file=out)
        if st.newer:
            print(
                f"refused         made by a newer gateway (schema {st.current}): run that "
                "version, or restore a backup made with this one",
                file=out,
            )
        elif st.pending:
            print(
                f"pending         {', '.join(map(str, st.pending))} "
                "(gateway db migrate, or the next start, applies them)",
                file=out,
            )
        else:
            print("pending         none: up to date", file=out)
    return 0 if not st.pending and not st.newer else 1


def db_migrate(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    applied = migrate_database(cfg)
    st = schema_status(cfg)
    if applied:
        print(
            f"applied {', '.join(map(str, applied))}: {st.engine} {st.database} is at "
            f"schema {st.current}",
            file=out,
        )
    else:
        print(f"nothing to do: {st.engine} {st.database} is at schema {st.current}", file=out)
    return 0
