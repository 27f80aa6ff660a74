"""``gateway audit show|verify``: read the audit trail, and check its hash chain."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from gateway.commands.base import Subparsers, needs_config, utc_date
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.security.audit import EVENTS, AuditLog, records, trail_path, verify

#: Table columns of ``audit show``: what the detail column is cut to.
DETAIL_CHARS = 70


def register(sub: Subparsers) -> None:
    audit = sub.add_parser("audit", help="the audit trail: who sent what, where it went")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    show = needs_config(
        asub.add_parser(
            "show",
            help="the trail's records, filtered: who sent what, where it went, what was refused",
            description="Print the audit trail's records that match every filter given,\n"
            "oldest first: the newest --limit of them (default 50; 0: all). It answers\n"
            "'did study X arrive, and where did it go?' (--study), 'what happened to\n"
            "message Y?' (--message), 'what did this PACS send today?' (--peer, --since).\n"
            "Reading the trail is itself recorded in it (a query record, with the filters).",
            epilog="examples:\n"
            "  gateway audit show --study 1.2.840.113619.2.55.3.1234\n"
            "  gateway audit show --message MSG00042 --json\n"
            "  gateway audit show --peer PACS --since 2026-12-01 --limit 0\n"
            "  gateway audit show --failures --event security-alert",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
        audit_show,
    )
    show.add_argument("file", nargs="?", type=Path, help="a trail file (default: the gateway's)")
    show.add_argument(
        "--event",
        action="append",
        choices=sorted(EVENTS),
        metavar="EVENT",
        help=f"only these events (repeatable): {', '.join(sorted(EVENTS))}",
    )
    show.add_argument("--study", metavar="UID", help="records naming this Study Instance UID")
    show.add_argument("--message", metavar="ID", help="records naming this HL7 MSH-10")
    show.add_argument(
        "--peer",
        metavar="NAME",
        help="records whose sender or destination has this AE title, host, application, "
        "facility or destination name (any case)",
    )
    show.add_argument("--failures", action="store_true", help="only records that are not success")
    show.add_argument("--since", type=utc_date, metavar="DATE", help="written on or after (UTC)")
    show.add_argument("--until", type=utc_date, metavar="DATE", help="written before (UTC)")
    show.add_argument(
        "--limit", type=int, default=50, metavar="N", help="the newest N matches (0: all)"
    )
    show.add_argument("--json", action="store_true", help="the records as stored, one per line")
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


def audit_show(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    path = args.file or trail_path(cfg.data_dir)
    if not path.exists():
        print(f"{path}: no audit trail (the gateway writes it once it runs)", file=out)
        return 1
    if args.limit < 0:
        raise GatewayError("--limit takes a number of records, 0 for all")
    wanted = _Filter(args)
    shown: deque[dict[str, Any]] = deque(maxlen=args.limit or None)
    read = 0
    for record in _records(path):
        read += 1
        if wanted(record):
            shown.append(record)
    _record_the_reading(cfg, path, args)
    if args.json:
        for record in shown:
            print(json.dumps(record, ensure_ascii=False, separators=(",", ":")), file=out)
        return 0
    rows = [_row(r) for r in shown]
    header = ("seq", "time (UTC)", "event", "outcome", "from", "to", "objects", "detail")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header[:-1])]
    for row in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    more = "" if args.limit == 0 or len(shown) < args.limit else f" (the newest {args.limit})"
    print(f"{len(shown)} of {read} records{more}", file=out)
    return 0


class _Filter:
    """Whether a record matches every filter of ``audit show``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.events = set(args.event or ())
        self.ids = [v for v in (args.study, args.message) if v]
        self.peer = args.peer.casefold() if args.peer else None
        self.failures = bool(args.failures)
        self.since: float | None = args.since
        self.until: float | None = args.until

    def __call__(self, record: Mapping[str, Any]) -> bool:
        if self.events and record.get("event") not in self.events:
            return False
        if self.failures and record.get("outcome") == "success":
            return False
        objects = record.get("objects") or []
        if any(all(o.get("id") != want for o in objects) for want in self.ids):
            return False
        if self.peer is not None:
            parties = [record.get("actor") or {}, record.get("destination") or {}]
            names = {str(v).casefold() for p in parties for k, v in p.items() if k != "port"}
            if self.peer not in names:
                return False
        if self.since is not None or self.until is not None:
            when = _when(record)
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The trail's records, one by one (a trail can be large); a torn last line is left."""
    with path.open("rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line: `gateway audit verify` reports it
            if isinstance(record, dict):
                yield record


def _when(record: Mapping[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(record.get("time"))).timestamp()
    except ValueError:
        return None


def _party(party: Mapping[str, Any] | None) -> str:
    """A sender or destination in a few characters: ``pacs: ARCHIVE@10.0.0.9:104``,
    ``EHR/HOSP@10.0.0.7``, ``gateway-cli (alice)``."""
    if not party:
        return ""
    name = str(party.get("ae_title") or party.get("application") or "")
    if party.get("facility"):
        name = f"{name}/{party['facility']}"
    where = str(party.get("host") or "")
    if party.get("port"):
        where = f"{where}:{party['port']}"
    text = f"{name}@{where}" if name and where else name or where
    if party.get("node"):
        text = f"{party['node']}: {text}" if text else str(party["node"])
    if party.get("user") and not party.get("ae_title"):
        text = f"{text} ({party['user']})"
    return text


def _objects(objects: list[Mapping[str, Any]]) -> str:
    parts = []
    for o in objects:
        if "id" in o:
            parts.append(f"{o['type']} {o['id']}")
        else:
            parts.append(f"{o.get('count')} {o['type']}")
    return "; ".join(parts)


def _row(record: Mapping[str, Any]) -> tuple[str, ...]:
    outcome = str(record.get("outcome", ""))
    detail = str(record.get("detail") or "")
    if len(detail) > DETAIL_CHARS:
        detail = detail[: DETAIL_CHARS - 1] + "…"
    return (
        str(record.get("seq", "")),
        str(record.get("time", ""))[:19].replace("T", " "),
        str(record.get("event", "")),
        "" if outcome == "success" else outcome,
        _party(record.get("actor")),
        _party(record.get("destination")),
        _objects(record.get("objects") or []),
        detail,
    )


def _record_the_reading(cfg: Config, path: Path, args: argparse.Namespace) -> None:
    """Reading the trail is an audit-trail query, recorded with the filters given.  Best
    effort: a reader allowed to read the file but not to append to it is told so."""
    given = [
        f"--{name} {value}"
        for name, value in (
            ("event", ",".join(args.event or ())),
            ("study", args.study),
            ("message", args.message),
            ("peer", args.peer),
            ("since", _iso(args.since)),
            ("until", _iso(args.until)),
        )
        if value
    ] + (["--failures"] if args.failures else [])
    try:
        with AuditLog.open(path) as trail:
            trail.write(records.audit_trail_read(records.cli_user(), path.name, " ".join(given)))
    except Exception as exc:  # reading is allowed where writing is not
        print(f"note: this reading is not recorded in the trail: {exc}", file=sys.stderr)


def _iso(when: float | None) -> str | None:
    return None if when is None else dt.datetime.fromtimestamp(when, dt.UTC).isoformat()
