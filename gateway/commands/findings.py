"""``gateway findings query|export|stats``: the findings store, for quality review.

Every model run is a row (``ai_runs``) with its findings (``ai_findings``): see
:mod:`gateway.store.findings`.  Studies appear by their study key (a keyed hash, shown
to 12 characters in tables), never by UID, accession number or patient.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from gateway.commands.base import Subparsers, needs_config, utc_date
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.findings.concordance import Interval, discordant
from gateway.findings.stats import stats
from gateway.security.audit import AuditLog, records, trail_path
from gateway.store.backend import database_label, database_password, open_queue, queue_exists
from gateway.store.findings import (
    FINDING_COLUMNS,
    RUN_COLUMNS,
    STATUSES,
    ModelRun,
    RunFilter,
)
from gateway.store.store import Store, attr_text

#: the columns of ``query --json`` and ``export``: one row per finding (a run without
#: findings is one row with empty finding columns: the model looked and found nothing)
_RUN_PART = tuple(c for c in RUN_COLUMNS if c not in ("id", "subject"))  # run_id first
_FINDING_PART = (*FINDING_COLUMNS, "measurements")
COLUMNS = ("run_id", *_RUN_PART, *_FINDING_PART)
_TIMES = ("received_at", "complete_at", "inferred_at", "delivered_at")


def register(sub: Subparsers) -> None:
    findings = sub.add_parser(
        "findings",
        help="the findings store: every AI finding as a row, prevalence, drift, concordance",
        description="Query, export and summarise what the models found. Each model run is "
        "kept with its findings (code, status, probability, measurements) for "
        "findings.retention_days; a study is named by its study key, never by patient or UID.",
    )
    fsub = findings.add_subparsers(dest="findings_command", metavar="ACTION", required=True)
    query = needs_config(
        fsub.add_parser(
            "query",
            help="list findings (one line per finding; a run that found nothing as one line)",
        ),
        findings_command,
    )
    _filters(query)
    query.add_argument("--json", action="store_true", help="JSON lines, one per row")
    query.add_argument("--limit", type=int, default=None, metavar="N", help="the newest N rows")
    export = needs_config(
        fsub.add_parser("export", help="write the rows to a CSV or Parquet file"),
        findings_command,
    )
    _filters(export)
    export.add_argument("--format", choices=("csv", "parquet"), required=True)
    export.add_argument("file", type=Path, metavar="FILE", help="where to write ('-': stdout, csv)")
    statistics = needs_config(
        fsub.add_parser(
            "stats",
            help="positive rate by month, model version and modality; probability histograms; "
            "concordance with the radiologists' reports",
        ),
        findings_command,
    )
    _filters(statistics)
    statistics.add_argument("--json", action="store_true", help="machine-readable output")
    statistics.add_argument(
        "--discordant",
        type=int,
        default=10,
        metavar="N",
        help="list the N newest discordant studies for review (default 10)",
    )

    reidentify = needs_config(
        fsub.add_parser(
            "reidentify",
            help="the Study Instance UID and accession number of a study key, audited",
            description="Turn a study key of the findings store (as query and stats show it: "
            "its first 12 characters are enough) back into the study's Study Instance UID "
            "and accession number, to find it in the PACS for quality review. Each use is "
            "a re-identification record in the audit trail, with the reason given. The "
            "identifiers are kept only while the study is (gateway.retention_days): after "
            "that the key cannot be turned back.",
        ),
        findings_command,
    )
    reidentify.add_argument("study_key", metavar="STUDY_KEY", help="a study key, or its start")
    reidentify.add_argument(
        "--reason", required=True, help="why (recorded in the audit trail), e.g. 'QA review'"
    )
    reidentify.add_argument("--json", action="store_true", help="machine-readable output")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name, as in the config")
    p.add_argument("--version", help="model version")
    p.add_argument("--code", help="finding code value, concept or finding name")
    p.add_argument("--status", choices=STATUSES, help="finding status")
    p.add_argument("--modality", help="DICOM modality of the study (CT, MR...)")
    p.add_argument("--study", metavar="KEY", help="a study key, or its first characters")
    p.add_argument("--since", type=utc_date, metavar="DATE", help="inferred on or after (UTC)")
    p.add_argument("--until", type=utc_date, metavar="DATE", help="inferred before (UTC)")


def findings_command(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    database, password = cfg.gateway.database, database_password(cfg)
    if not queue_exists(cfg.data_dir, database, password):
        where = database_label(database, cfg.data_dir)
        print(f"no queue yet at {where} (the gateway has not run with this config)", file=out)
        return 0
    if args.findings_command == "reidentify":
        return _reidentify(cfg, args, out)
    flt = RunFilter(
        model=args.model,
        version=args.version,
        code=args.code,
        status=args.status,
        modality=args.modality,
        study=args.study,
        since=args.since,
        until=args.until,
    )
    queue = open_queue(cfg.data_dir, database=database, password=password)
    try:
        runs = queue.findings_runs(flt)
    finally:
        queue.close()
    if args.findings_command == "query":
        return _query(runs, args, out)
    if args.findings_command == "export":
        return _export(runs, args, out)
    return _stats(runs, args, out)


def rows(runs: Sequence[ModelRun], flt: RunFilter | None = None) -> Iterator[dict[str, Any]]:
    """One dict per finding (:data:`COLUMNS`), a run without findings as one row; with a
    finding filter (code, status) only the matching findings of each run."""
    for run in runs:
        base: dict[str, Any] = {"run_id": run.id}
        for name in _RUN_PART:
            value = getattr(run, name)
            base[name] = _iso(value) if name in _TIMES else value
        found = [f for f in run.findings if _matches(f, flt)]
        if not run.findings:
            yield {**base, **dict.fromkeys(_FINDING_PART)}
        for f in found:
            yield {
                **base,
                **{name: getattr(f, name) for name in FINDING_COLUMNS},
                "measurements": {m.name: [m.value, m.unit] for m in f.measurements},
            }


def _matches(f: Any, flt: RunFilter | None) -> bool:
    if flt is None:
        return True
    if flt.code is not None and flt.code not in (f.code_value, f.concept, f.finding):
        return False
    return flt.status is None or f.status == flt.status


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return (
        dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _filter_of(args: argparse.Namespace) -> RunFilter:
    return RunFilter(code=args.code, status=args.status)


def _query(runs: Sequence[ModelRun], args: argparse.Namespace, out: TextIO) -> int:
    table = list(rows(runs, _filter_of(args)))
    if args.limit is not None:
        table = table[-args.limit :] if args.limit > 0 else []
    if args.json:
        for row in table:
            out.write(json.dumps(row) + "\n")
        return 0
    if not table:
        print("no findings match", file=out)
        return 0
    print(
        f"{'inferred (UTC)':<20} {'study':<12} {'mod':<4} {'model':<16} {'version':<8} "
        f"{'finding':<22} {'status':<9} {'p':>5}  measurements",
        file=out,
    )
    for row in table:
        p = row["probability"]
        measures = ", ".join(
            f"{name} {value:g} {unit}"
            for name, (value, unit) in (row["measurements"] or {}).items()
        )
        print(
            f"{(row['inferred_at'] or '')[:19]:<20} {(row['study_key'] or '-')[:12]:<12} "
            f"{(row['modality'] or '-')[:4]:<4} {row['model'][:16]:<16} "
            f"{row['model_version'][:8]:<8} {(row['finding'] or '(none found)')[:22]:<22} "
            f"{(row['status'] or '-'):<9} {'' if p is None else f'{p:.2f}':>5}  {measures}",
            file=out,
        )
    print(f"{len(table)} rows from {len(runs)} model runs", file=out)
    return 0


def _export(runs: Sequence[ModelRun], args: argparse.Namespace, out: TextIO) -> int:
    table = rows(runs, _filter_of(args))
    total = sum(max(1, len(r.findings)) for r in runs)
    progress = _Progress(total)
    if args.format == "csv":
        written = _write_csv(table, args.file, progress)
    else:
        if str(args.file) == "-":
            raise GatewayError("Parquet is binary: give a FILE, not '-'")
        written = _write_parquet(table, args.file, progress)
    progress.done(written)
    if str(args.file) != "-":
        print(f"wrote {written} rows ({len(runs)} model runs) to {args.file}", file=out)
    return 0


class _Progress:
    """Progress on stderr for long exports: a line every 10 % (or 50,000 rows)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.step = max(50_000, total // 10) if total > 50_000 else 0
        self.next = self.step

    def tick(self, written: int) -> None:
        if self.step and written >= self.next:
            print(f"exported {written:,} of {self.total:,} rows", file=sys.stderr, flush=True)
            self.next += self.step

    def done(self, written: int) -> None:
        if self.step:
            print(f"exported {written:,} rows", file=sys.stderr, flush=True)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "measurements": json.dumps(row["measurements"]) if row["measurements"] else ""}


def _write_csv(table: Iterator[dict[str, Any]], path: Path, progress: _Progress) -> int:
    target = sys.stdout if str(path) == "-" else path.open("w", newline="", encoding="utf-8")
    written = 0
    try:
        writer = csv.DictWriter(target, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow(_flat(row))
            written += 1
            progress.tick(written)
    finally:
        if target is not sys.stdout:
            target.close()
    return written


def _write_parquet(table: Iterator[dict[str, Any]], path: Path, progress: _Progress) -> int:
    # heavy: 0.44 s to import, so only this command loads it (not every `gateway` call)
    import pyarrow as pa
    import pyarrow.parquet as pq  # heavy, as above

    text = pa.string()
    number = pa.float64()
    schema = pa.schema([(name, number if name == "probability" else text) for name in COLUMNS])
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in table:
            batch.append(_flat(row))
            written += 1
            if len(batch) == 10_000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
            progress.tick(written)
        if batch or not written:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return written


def _stats(runs: Sequence[ModelRun], args: argparse.Namespace, out: TextIO) -> int:
    figures = stats(runs)
    review = discordant(figures.comparisons)[: max(0, args.discordant)]
    if args.json:
        json.dump(
            {
                "runs": len(runs),
                "prevalence": [{**vars(p), "rate": round(p.rate, 4)} for p in figures.prevalence],
                "histograms": [
                    {
                        "model": h.model,
                        "version": h.version,
                        "edges": h.edges,
                        "counts": h.counts,
                        "findings": h.findings,
                    }
                    for h in figures.histograms
                ],
                "concordance": [_summary_json(s) for s in figures.concordance],
                "discordant": [
                    {
                        **vars(c),
                        "reported_at": _iso(c.reported_at),
                        "inferred_at": _iso(c.inferred_at),
                    }
                    for c in review
                ],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    if not runs:
        print("no model runs match", file=out)
        return 0
    print(f"{len(runs)} model runs\n\npositive rate by month, model version and modality", file=out)
    print(
        f"  {'month':<8} {'model':<18} {'version':<9} {'mod':<5} "
        f"{'runs':>6} {'pos':>6} {'rate':>7}",
        file=out,
    )
    for p in figures.prevalence:
        print(
            f"  {p.month:<8} {p.model[:18]:<18} {p.version[:9]:<9} {(p.modality or '-')[:5]:<5} "
            f"{p.runs:>6} {p.positive:>6} {p.rate:>7.1%}",
            file=out,
        )
    if figures.histograms:
        print("\nprobability of findings, by model version (10 bins from 0 to 1)", file=out)
        for h in figures.histograms:
            print(
                f"  {h.model} {h.version}: {' '.join(str(c) for c in h.counts)}  (n={h.findings})",
                file=out,
            )
    print("\nconcordance with the final reports (the report as reference)", file=out)
    if not figures.concordance:
        print("  none yet: no final report of a study that an image model processed", file=out)
    for s in figures.concordance:
        print(
            f"  {s.image_model} {s.image_version} on {s.concept}: {s.studies} studies, "
            f"agree {s.true_positive} positive + {s.true_negative} negative, "
            f"AI only {s.false_positive}, report only {s.false_negative}, "
            f"indeterminate {s.indeterminate}",
            file=out,
        )
        print(
            f"    sensitivity {_interval(s.sensitivity)}, PPV {_interval(s.ppv)}, "
            f"agreement {_interval(s.agreement)}",
            file=out,
        )
    if review:
        print(
            "\ndiscordant studies for review "
            "(study key; re-identify through the audited crosswalk)",
            file=out,
        )
        for c in review:
            print(
                f"  {c.study_key[:12]}  {c.concept}  AI {c.ai}, report {c.report}"
                f"{'' if c.reported_mention else ' (not mentioned)'}  ({c.outcome}; "
                f"{c.image_model} {c.image_version})",
                file=out,
            )
    return 0


def _interval(i: Interval) -> str:
    if i.value is None:
        return "n/a (0 studies)"
    return f"{i.value:.0%} [{i.low:.0%}-{i.high:.0%}] ({i.numerator}/{i.denominator})"


def _summary_json(s: Any) -> dict[str, Any]:
    out = dict(vars(s))
    for name in ("sensitivity", "ppv", "agreement"):
        out[name] = dict(vars(out[name]))
    return out


def _reidentify(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    prefix = args.study_key.strip().lower()
    if len(prefix) < 8 or not prefix.isalnum():
        raise GatewayError("give the study key, or at least its first 8 characters")
    reason = " ".join(args.reason.split())
    if not reason:
        raise GatewayError("--reason must say why (it goes into the audit trail)")
    store = Store.for_config(cfg, create=False)
    try:
        runs = store.queue.findings_runs(RunFilter(study=prefix))
        keys = sorted({r.study_key for r in runs if r.study_key})
        if not keys:
            raise GatewayError(f"no study key in the findings store starts with {prefix!r}")
        if len(keys) > 1:
            raise GatewayError(
                f"{len(keys)} study keys start with {prefix!r}: give more characters"
            )
        (key,) = keys
        envelopes = store.queue.study_envelopes(key)
        if not envelopes:
            raise GatewayError(
                f"study {key[:12]} is no longer stored (deleted after gateway.retention_days): "
                "its identifiers are gone, by design"
            )
        attrs = store.attrs(envelopes[0].id)
    finally:
        store.close()
    uid, accession = attr_text(attrs, "StudyInstanceUID"), attr_text(attrs, "AccessionNumber")
    entry = records.reidentified(
        records.cli_user(), study_key=key, study_uid=uid, accession=accession, reason=reason
    )
    with AuditLog.open(trail_path(cfg.data_dir)) as trail:  # before anything is shown
        trail.write(entry)
    if args.json:
        json.dump({"study_key": key, "study_uid": uid, "accession": accession}, out)
        out.write("\n")
    else:
        print(f"study key   {key}", file=out)
        print(f"study UID   {uid or '(not given)'}", file=out)
        print(f"accession   {accession or '(not given)'}", file=out)
        print("(recorded in the audit trail: re-identification)", file=out)
    return 0
