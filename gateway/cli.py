"""The ``gateway`` command.  Errors become a message and an exit code here, and only here:
0 = success, 1 = the operation failed (bad config, store error), 2 = bad usage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gateway import __version__
from gateway.config import DEFAULT_CONFIG, Config, json_schema, load_config
from gateway.envelope import Stage
from gateway.errors import ConfigError, GatewayError

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

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            metavar="FILE",
            help=f"config file (default: {DEFAULT_CONFIG})",
        )
        return sp

    run = with_config(
        sub.add_parser(
            "run",
            help="start the DICOM SCP, the MLLP listener and the health/metrics server",
            description="Start everything. SIGTERM (or Ctrl-C) stops accepting, finishes what is "
            "in flight and exits.",
        )
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    with_config(
        sub.add_parser(
            "check-config",
            help="validate a config file",
            description="Validate the config. Exit 0 when valid; exit 1 and one line per error "
            "(FILE:LINE: path.to.key: message) otherwise.",
        )
    )
    explain = with_config(
        sub.add_parser(
            "explain",
            help="dry run: which route a DICOM file/folder or HL7 message takes",
            description="For each INPUT (a DICOM file, a folder of DICOM files = one study per "
            "StudyInstanceUID, or an HL7 file with one or more messages): the matching route, "
            "the models it would run and where results would go. Reads the config and the "
            "inputs only: no network, nothing written. Exit 1 if an input cannot be read.",
        )
    )
    explain.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    explain.add_argument("-v", "--verbose", action="store_true", help="why each route was tried")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument(
        "--calling-ae",
        metavar="AE",
        help="calling AE title to assume for DICOM inputs (routes on calling_ae)",
    )
    sub.add_parser(
        "config-schema",
        help="print the config's JSON Schema (for editors)",
        description="Print the JSON Schema of the config file, e.g. for the YAML language "
        "server: gateway config-schema > gateway.schema.json",
    )

    queue = sub.add_parser("queue", help="inspect and replay the work queue")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    status = with_config(qsub.add_parser("status", help="counts per stage and state"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    dead = with_config(qsub.add_parser("dead", help="dead letters with their last error"))
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    retry = with_config(qsub.add_parser("retry", help="replay dead jobs"))
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    which.add_argument("--all", action="store_true", help="replay every dead job")

    models = sub.add_parser("models", help="the configured models: list them, run one offline")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mlist = with_config(
        msub.add_parser(
            "list",
            help="name, version, input and weights hash of each configured model",
            description="Read each configured bundle (no torch needed). Exit 1 when a bundle "
            "cannot be read; the line says why.",
        )
    )
    mlist.add_argument("--json", action="store_true", help="machine-readable output")
    mrun = with_config(
        msub.add_parser(
            "run",
            help="run one model offline on DICOM files/folders or text/HL7 files",
            description="Run model NAME here, in this process, on INPUT: for an image model "
            "the DICOM files and folders given (one study; the bundle's series selection "
            "picks the series), for a note model each text or HL7 file in turn (report "
            "text from OBX TX/FT/ST). Prints the findings. Nothing is sent or stored.",
        )
    )
    mrun.add_argument("name", metavar="NAME", help="a model name from the config's models:")
    mrun.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    mrun.add_argument("--json", action="store_true", help="print the whole result as JSON")
    mrun.add_argument("--mask", type=Path, metavar="FILE.npy", help="save the mask (image models)")
    mrun.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads")
    mrun.add_argument("--device", default="auto", help="auto (default), cpu or cuda")

    audit = sub.add_parser("audit", help="the audit trail: who sent what, where it went")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    averify = with_config(
        asub.add_parser(
            "verify",
            help="check the trail's hash chain; report the first edited or missing record",
            description="Read the audit trail (default: DATA_DIR/audit/audit.jsonl) and check "
            "every record's hash and its link to the one before. Exit 0 when intact; exit 1 "
            "with the first bad record and why (edited, missing, reordered, inserted, torn).",
        )
    )
    averify.add_argument("file", nargs="?", type=Path, help="a trail file (default: the gateway's)")
    averify.add_argument(
        "--anchor",
        metavar="SEQ:HASH",
        help="a head recorded elsewhere (the audit.head log line at shutdown, or the syslog "
        "copy): also catches records cut off the end or a rewritten tail",
    )
    certs = sub.add_parser("certs", help="certificates for trying TLS locally")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    dev = csub.add_parser(
        "dev",
        help="make a development CA, a server and client certificates in DIR",
        description="Create DIR/ca.pem, server.pem (+ .key) for the hosts given, and a client "
        "certificate per --client name, with a throw-away development CA (EC P-256). For "
        "trying TLS on loopback only: never for production. Refuses to overwrite files "
        "unless --force.",
    )
    dev.add_argument("dir", type=Path, metavar="DIR")
    dev.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="server name or address (repeatable; default 127.0.0.1 and localhost)",
    )
    dev.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="NAME",
        help="client certificate name (repeatable; default 'client')",
    )
    dev.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    dev.add_argument("--force", action="store_true", help="overwrite existing files")

    purge = with_config(
        sub.add_parser(
            "purge",
            help="delete what the gateway is done with (retention), now",
            description="Delete complete studies and HL7 messages received more than DAYS "
            "ago whose every job is done, their results and spool files, and data keys no "
            "object uses any more. Anything with a waiting, running or dead job is kept. "
            "The running gateway does this every hour when gateway.retention_days is set; "
            "this command does one pass now (safe beside a running gateway) and records it "
            "in the audit trail.",
        )
    )
    purge.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="retention in days (default: gateway.retention_days from the config)",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser("keys", help="manage the at-rest encryption keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    with_config(
        ksub.add_parser(
            "rotate",
            help="create a new data key; old data stays readable",
            description="Add a new data key and make it current. Blobs written before stay "
            "readable with their old key. Back up the key file afterwards.",
        )
    )
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
    if args.command == "config-schema":
        json.dump(json_schema(), out, indent=2)
        out.write("\n")
        return 0
    if args.command == "certs":
        return _dev_certs(args, out)
    cfg = load_config(args.config)
    if args.command == "audit":
        return _audit_verify(cfg, args, out)
    if args.command == "check-config":
        print(
            f"{args.config}: OK ({len(cfg.dicom.allowed_callers)} DICOM callers, "
            f"{len(cfg.hl7.allowed_senders)} HL7 senders, {len(cfg.destinations)} destinations, "
            f"{len(cfg.models)} models, {len(cfg.routes)} routes)",
            file=out,
        )
        return 0
    if args.command == "run":
        return _run(cfg, args.log_level)
    if args.command == "explain":
        return _explain(cfg, args, out)
    if args.command == "queue":
        return _queue(cfg, args, out)
    if args.command == "models":
        from gateway.infer.commands import models_list, models_run

        if args.models_command == "list":
            return models_list(cfg, args.json, out)
        return models_run(cfg, args, out)
    if args.command == "purge":
        return _purge(cfg, args, out)
    if args.command == "keys":
        from gateway.security.crypto import KeyStore

        store = KeyStore.open(cfg.key_file, create=True)
        new = store.rotate()
        _audit_key_rotation(cfg, new.key_id)
        print(
            f"new data key {new.key_id} is current; {len(store.key_ids)} keys in "
            f"{cfg.key_file} (back this file up)",
            file=out,
        )
        return 0
    raise AssertionError(args.command)


def _purge(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    from gateway.security.audit import AuditLog, records, trail_path
    from gateway.services.retention import audit_entry, purge
    from gateway.store.store import Store

    days = args.older_than if args.older_than is not None else cfg.gateway.retention_days
    if days is None:
        raise GatewayError(
            f"no retention: set gateway.retention_days in {cfg.source} or pass --older-than DAYS"
        )
    if days < 0:
        raise GatewayError("--older-than takes a number of days >= 0")
    if not (cfg.data_dir / "queue.sqlite3").exists():
        print(f"{cfg.data_dir}: no gateway data here, nothing to purge", file=out)
        return 0
    store = Store(cfg.data_dir, cfg.key_file, create=False)
    try:
        report = purge(store, days, dry_run=args.dry_run)
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
    if report.kept:
        print(
            f"kept: {report.kept} old enough but with a job waiting, running or dead "
            "(see gateway queue status / queue dead)",
            file=out,
        )
    return 0


def _audit_key_rotation(cfg: Config, key_id: str) -> None:
    from gateway.security.audit import AuditLog, records, trail_path

    with AuditLog.open(trail_path(cfg.data_dir)) as trail:  # safe beside a running gateway
        trail.write(records.key_rotation(records.cli_user(), key_id))


def _audit_verify(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    from gateway.security.audit import trail_path, verify

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


def _dev_certs(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.security.certs import describe, make_dev_pki

    try:
        pki = make_dev_pki(
            args.dir,
            hosts=tuple(args.hosts or ("127.0.0.1", "localhost")),
            days=args.days,
            client_names=tuple(args.clients or ("client",)),
            overwrite=args.force,
        )
    except FileExistsError:
        raise GatewayError(
            f"{args.dir} already holds development certificates; nothing was written. Use "
            "--force to replace them (peers that trust the old CA stop working)"
        ) from None
    print(f"development certificates in {pki.folder} (NOT for production):", file=out)
    for files in (pki.ca, pki.server, *pki.clients.values()):
        print(f"\n{files.cert} (key {files.key})\n{describe(files.cert)}", file=out)
    print(
        f"\nuse: dicom.tls / hl7.tls {{cert: {pki.server.cert}, key: {pki.server.key}, "
        f"ca: {pki.ca.cert}}}",
        file=out,
    )
    return 0


def _run(cfg: Config, log_level: str) -> int:
    from gateway.app import Gateway
    from gateway.observability.logging import configure_logging

    configure_logging(log_level)
    gw = Gateway(cfg)
    gw.run_forever()
    return 0


def _explain(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``gateway explain``: routing as a dry run.  Only the config and the inputs are read."""
    from gateway.errors import MalformedInput
    from gateway.route import decide
    from gateway.route.attributes import subjects_in
    from gateway.route.keywords import routing_keywords

    def where(name: str) -> dict[str, str]:
        dest = cfg.destinations[name]
        tls = " TLS" if (dest.dicom or dest.hl7).tls else ""  # type: ignore[union-attr]
        if dest.dicom is not None:
            d = dest.dicom
            return {
                "name": name,
                "kind": "dicom",
                "address": f"{d.ae_title}@{d.host}:{d.port}",
                "text": f"{name} (DICOM{tls} {d.ae_title}@{d.host}:{d.port})",
            }
        h = dest.hl7
        assert h is not None
        address = f"{h.application}^{h.facility}@{h.host}:{h.port}"
        return {
            "name": name,
            "kind": "hl7",
            "address": address,
            "text": f"{name} (HL7{tls} {address})",
        }

    failed = False
    report: list[dict[str, object]] = []
    for path in args.inputs:
        try:
            subjects = subjects_in(path, args.calling_ae, routing_keywords(cfg.routes))
        except MalformedInput as exc:
            print(f"gateway: error: {exc.message}", file=sys.stderr)
            failed = True
            continue
        for subject in subjects:
            decision = decide(subject.attrs, cfg.routes)
            send = [where(n) for n in decision.send]
            forward = [where(n) for n in decision.forward]
            if args.json:
                report.append(
                    {
                        "input": subject.label,
                        "kind": subject.attrs.kind,
                        **subject.ids,
                        "route": decision.route,
                        "run": list(decision.run),
                        "send": [{k: v for k, v in d.items() if k != "text"} for d in send],
                        "forward": [{k: v for k, v in d.items() if k != "text"} for d in forward],
                        "reasons": list(decision.reasons),
                    }
                )
                continue
            outcome = (
                f"route '{decision.route}'"
                if decision.matched
                else "no route matches: stored, logged, not processed"
            )
            print(f"{subject.label}: {subject.summary} → {outcome}", file=out)
            if args.verbose:
                for reason in decision.reasons or ("no routes configured",):
                    print(f"  {reason}", file=out)
            if decision.run:
                print(f"  run: {', '.join(decision.run)}", file=out)
            if send:
                print(f"  send results to: {', '.join(d['text'] for d in send)}", file=out)
            if forward:
                print(
                    f"  forward as received to: {', '.join(d['text'] for d in forward)}", file=out
                )
            if decision.matched and not (decision.run or send or forward):
                print("  (the route names no models and no destinations)", file=out)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    return 1 if failed else 0


def _queue(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    from gateway.store.sqlite import SQLiteQueue

    db = cfg.data_dir / "queue.sqlite3"
    if not db.exists():
        if getattr(args, "json", False):
            out.write("{}\n" if args.queue_command == "status" else "[]\n")
        else:
            print(f"no queue yet at {db} (the gateway has not run with this config)", file=out)
        return 1 if args.queue_command == "retry" else 0
    queue = SQLiteQueue(db)
    try:
        if args.queue_command == "status":
            counts = queue.counts()
            if args.json:
                json.dump(counts, out, indent=2)
                out.write("\n")
                return 0
            _print_status(counts, queue.oldest_ready_age(time.time()), out)
            return 0
        if args.queue_command == "dead":
            jobs = queue.dead_jobs()
            if args.json:
                json.dump(
                    [
                        {
                            "id": j.id,
                            "stage": j.stage.value,
                            "subject": j.subject,
                            "attempts": j.attempts,
                            "last_error": j.last_error,
                        }
                        for j in jobs
                    ],
                    out,
                    indent=2,
                )
                out.write("\n")
                return 0
            if not jobs:
                print("no dead letters", file=out)
            for j in jobs:
                print(
                    f"{j.id:>8}  {j.stage.value:<8} {j.subject[:12]}  attempts={j.attempts}  "
                    f"{j.last_error}",
                    file=out,
                )
            return 0
        if args.queue_command == "retry":
            n = queue.replay(None if args.all else list(args.ids), time.time())
            print(f"{n} job(s) returned to the queue", file=out)
            return 0 if n or args.all else 1
    finally:
        queue.close()
    raise AssertionError(args.queue_command)


def _print_status(counts: dict[str, dict[str, int]], oldest: float | None, out: TextIO) -> None:
    received = counts.get("received", {})
    studies = counts.get("studies", {})
    print(
        f"received   dicom instances: {received.get('dicom', 0)}   "
        f"hl7 messages: {received.get('hl7', 0)}",
        file=out,
    )
    print(
        f"studies    open (assembling): {studies.get('open', 0)}   "
        f"complete: {studies.get('complete', 0)}",
        file=out,
    )
    print(f"{'stage':<10}{'ready':>8}{'leased':>8}{'done':>8}{'dead':>8}", file=out)
    order = {f"jobs:{stage.value}": i for i, stage in enumerate(Stage)}  # pipeline order
    stages = sorted(
        (k for k in counts if k.startswith("jobs:")), key=lambda k: (order.get(k, 99), k)
    )
    for key in stages:
        s = counts[key]
        print(
            f"{key[5:]:<10}{s.get('ready', 0):>8}{s.get('leased', 0):>8}"
            f"{s.get('done', 0):>8}{s.get('dead', 0):>8}",
            file=out,
        )
    if not stages:
        print("(no jobs yet)", file=out)
    if oldest is not None:
        print(f"oldest waiting job: {oldest:.0f} s", file=out)


if __name__ == "__main__":
    raise SystemExit(main())
