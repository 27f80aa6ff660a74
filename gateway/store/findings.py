"""The findings store: every model result as typed rows, kept apart from the sealed blobs.

A model run (:class:`ModelRun`) is one row of ``ai_runs`` and each of its findings
(:class:`FindingRecord`) one row of ``ai_findings``.  They are written in the transaction
that completes the infer job (``Queue.complete(..., run=...)``), so a result is in the
store exactly when its job is done; the time its result reached a destination is added
when the delivery job completes.  Both queue engines create the same two tables (SQLite
schema 4, PostgreSQL migration 3) from :func:`schema` and run the statements here.

What a row holds is what a quality review may see: the study is named by its study key (a
keyed hash of the Study Instance UID, never the UID), the accession by a keyed hash of its
own, the model by name, version and the sha256 of its weights.  No patient name,
identifier or UID is stored.  Rows are purged after ``findings.retention_days`` (aggregate
statistics outlive images), by :meth:`purge_runs`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["present", "absent", "uncertain"]
STATUSES: tuple[Status, ...] = ("present", "absent", "uncertain")


@dataclass(frozen=True)
class Measurement:
    name: str  # e.g. diameter_mm
    value: float
    unit: str  # UCUM: mm, mm3


@dataclass(frozen=True)
class FindingRecord:
    """One finding of one model run."""

    finding: str  # the model's own name ("lung nodule", "pneumothorax")
    concept: str  # what reports and images are compared by (metadata "concept", else the code)
    code_scheme: str  # SCT, RADLEX, DCM, or "" when the model gave no code
    code_value: str
    code_meaning: str
    status: Status
    probability: float | None = None
    measurements: tuple[Measurement, ...] = ()


@dataclass(frozen=True)
class ModelRun:
    """One completed model run on a study (image models) or a report (note models)."""

    id: str
    kind: Literal["dicom", "hl7"]
    subject: str  # the study key (DICOM) or the message's envelope id (HL7)
    study_key: str | None  # the study: its own key, or the one a report names
    accession_ref: str | None  # keyed hash of the accession number
    modality: str
    body_part: str
    model: str  # the name in the gateway config
    model_version: str
    weights_sha256: str
    route: str
    report_status: str  # OBR-25 of a report ("F" final, "P" preliminary...); "" for images
    received_at: float | None  # the study's first instance, or the message
    complete_at: float | None  # the study's quiet period ended (a message: when received)
    inferred_at: float
    concepts: tuple[str, ...] = ()  # what the model looks for: absent unless found
    findings: tuple[FindingRecord, ...] = ()
    delivered_at: float | None = None

    @property
    def positive(self) -> bool:
        return any(f.status == "present" for f in self.findings)


@dataclass(frozen=True)
class RunFilter:
    """Which runs (and findings) a query reads; every field optional."""

    model: str | None = None
    version: str | None = None
    code: str | None = None  # matches the code value, the concept or the finding name
    status: str | None = None
    modality: str | None = None
    since: float | None = None  # inferred at or after
    until: float | None = None  # inferred before
    kind: str | None = None
    study: str | None = None  # a study key, or its first characters (as tables show it)


# --- schema --------------------------------------------------------------------------


def schema(*, postgres: bool) -> list[str]:
    """The statements that create the findings tables (the same columns on both engines)."""
    real = "double precision" if postgres else "REAL"
    return [
        f"""CREATE TABLE IF NOT EXISTS ai_runs (
    id              text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('dicom', 'hl7')),
    subject         text NOT NULL,
    study_key       text,
    accession_ref   text,
    modality        text NOT NULL DEFAULT '',
    body_part       text NOT NULL DEFAULT '',
    model           text NOT NULL,
    model_version   text NOT NULL,
    weights_sha256  text NOT NULL DEFAULT '',
    route           text NOT NULL DEFAULT '',
    report_status   text NOT NULL DEFAULT '',
    concepts        text NOT NULL DEFAULT '[]',
    received_at     {real},
    complete_at     {real},
    inferred_at     {real} NOT NULL,
    delivered_at    {real},
    findings        integer NOT NULL DEFAULT 0,
    positive        integer NOT NULL DEFAULT 0
)""",
        "CREATE INDEX IF NOT EXISTS ai_runs_inferred ON ai_runs (inferred_at)",
        "CREATE INDEX IF NOT EXISTS ai_runs_study ON ai_runs (study_key)",
        "CREATE INDEX IF NOT EXISTS ai_runs_subject ON ai_runs (model, subject)",
        f"""CREATE TABLE IF NOT EXISTS ai_findings (
    run_id        text NOT NULL REFERENCES ai_runs (id) ON DELETE CASCADE,
    seq           integer NOT NULL,
    finding       text NOT NULL,
    concept       text NOT NULL,
    code_scheme   text NOT NULL DEFAULT '',
    code_value    text NOT NULL DEFAULT '',
    code_meaning  text NOT NULL DEFAULT '',
    status        text NOT NULL CHECK (status IN ('present', 'absent', 'uncertain')),
    probability   {real},
    measurements  text NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, seq)
)""",
        "CREATE INDEX IF NOT EXISTS ai_findings_concept ON ai_findings (concept, status)",
    ]


# --- statements, written with :name parameters (SQLite's style; see :func:`pg`) ------

INSERT_RUN = (
    "INSERT INTO ai_runs (id, kind, subject, study_key, accession_ref, modality, body_part,"
    " model, model_version, weights_sha256, route, report_status, concepts, received_at,"
    " complete_at, inferred_at, delivered_at, findings, positive)"
    " VALUES (:id, :kind, :subject, :study_key, :accession_ref, :modality, :body_part,"
    " :model, :model_version, :weights_sha256, :route, :report_status, :concepts,"
    " :received_at, :complete_at, :inferred_at, :delivered_at, :findings, :positive)"
)
INSERT_FINDING = (
    "INSERT INTO ai_findings (run_id, seq, finding, concept, code_scheme, code_value,"
    " code_meaning, status, probability, measurements)"
    " VALUES (:run_id, :seq, :finding, :concept, :code_scheme, :code_value, :code_meaning,"
    " :status, :probability, :measurements)"
)
# the newest run of (model, subject) that has not reached a destination yet
MARK_DELIVERED = (
    "UPDATE ai_runs SET delivered_at = :now WHERE id = (SELECT id FROM ai_runs"
    " WHERE model = :model AND subject = :subject ORDER BY inferred_at DESC LIMIT 1)"
    " AND delivered_at IS NULL"
)
# what changes when a run inferred since :since is added or purged (runs are inferred now:
# one added moves the newest time; one purged, or gone out of the window, the count)
MARK = (
    "SELECT COUNT(*) AS n, MIN(inferred_at) AS oldest, MAX(inferred_at) AS newest"
    " FROM ai_runs WHERE inferred_at >= :since"
)
PURGE_RUNS = "DELETE FROM ai_runs WHERE inferred_at < :cutoff"
COUNT_PURGE = "SELECT COUNT(*) AS n FROM ai_runs WHERE inferred_at < :cutoff"
# SQLite enforces ON DELETE CASCADE only with foreign_keys on: delete the findings first
PURGE_FINDINGS = (
    "DELETE FROM ai_findings WHERE run_id IN (SELECT id FROM ai_runs WHERE inferred_at < :cutoff)"
)

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


def pg(sql: str) -> str:
    """*sql* with psycopg's ``%(name)s`` parameters instead of ``:name``."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))


#: the columns of ``ai_runs`` that hold one plain value each, in table order
RUN_COLUMNS = (
    "id",
    "kind",
    "subject",
    "study_key",
    "accession_ref",
    "modality",
    "body_part",
    "model",
    "model_version",
    "weights_sha256",
    "route",
    "report_status",
    "received_at",
    "complete_at",
    "inferred_at",
    "delivered_at",
)


def run_params(run: ModelRun) -> dict[str, Any]:
    return {
        **{name: getattr(run, name) for name in RUN_COLUMNS},
        "concepts": json.dumps(list(run.concepts)),
        "findings": len(run.findings),
        "positive": int(run.positive),
    }


#: the columns of ``ai_findings`` that hold one plain value each (besides run_id, seq)
FINDING_COLUMNS = (
    "finding",
    "concept",
    "code_scheme",
    "code_value",
    "code_meaning",
    "status",
    "probability",
)


def finding_params(run_id: str, seq: int, f: FindingRecord) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": seq,
        **{name: getattr(f, name) for name in FINDING_COLUMNS},
        "measurements": json.dumps([[m.name, m.value, m.unit] for m in f.measurements]),
    }


def insert_run(execute: Callable[[str, dict[str, Any]], object], run: ModelRun) -> None:
    """Write *run* and its findings with *execute* (inside the caller's transaction)."""
    execute(INSERT_RUN, run_params(run))
    for seq, f in enumerate(run.findings):
        execute(INSERT_FINDING, finding_params(run.id, seq, f))


def select_runs(flt: RunFilter) -> tuple[str, dict[str, Any]]:
    """The runs *flt* selects (a run matches a finding filter when one of its findings
    does), oldest first, with their findings: ``LEFT JOIN``, one row per finding."""
    where, params = _where(flt)
    sql = (
        "SELECT r.*, f.seq, f.finding, f.concept, f.code_scheme, f.code_value,"
        " f.code_meaning, f.status, f.probability, f.measurements"
        " FROM ai_runs r LEFT JOIN ai_findings f ON f.run_id = r.id"
        f"{where} ORDER BY r.inferred_at, r.id, f.seq"
    )
    return sql, params


def _where(flt: RunFilter) -> tuple[str, dict[str, Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for column, value in (
        ("r.model", flt.model),
        ("r.model_version", flt.version),
        ("r.modality", flt.modality),
        ("r.kind", flt.kind),
    ):
        if value is not None:
            name = column.split(".")[1]
            clauses.append(f"{column} = :{name}")
            params[name] = value
    if flt.study is not None:
        clauses.append("substr(r.study_key, 1, :study_len) = :study")
        params["study"], params["study_len"] = flt.study, len(flt.study)
    if flt.since is not None:
        clauses.append("r.inferred_at >= :since")
        params["since"] = flt.since
    if flt.until is not None:
        clauses.append("r.inferred_at < :until")
        params["until"] = flt.until
    finding: list[str] = []
    if flt.code is not None:
        finding.append("(g.code_value = :code OR g.concept = :code OR g.finding = :code)")
        params["code"] = flt.code
    if flt.status is not None:
        finding.append("g.status = :status")
        params["status"] = flt.status
    if finding:
        clauses.append(
            "EXISTS (SELECT 1 FROM ai_findings g WHERE g.run_id = r.id AND "
            + " AND ".join(finding)
            + ")"
        )
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def runs_from_rows(rows: Iterable[Any]) -> Iterator[ModelRun]:
    """Group the rows of :func:`select_runs` (ordered by run) into runs with findings."""
    first: Any = None  # the current run's first row
    found: list[FindingRecord] = []
    for row in rows:
        if first is None or first["id"] != row["id"]:
            if first is not None:
                yield _run_from_row(first, tuple(found))
            first, found = row, []
        if row["seq"] is not None:
            found.append(
                FindingRecord(
                    finding=row["finding"],
                    concept=row["concept"],
                    code_scheme=row["code_scheme"],
                    code_value=row["code_value"],
                    code_meaning=row["code_meaning"],
                    status=row["status"],
                    probability=row["probability"],
                    measurements=tuple(
                        Measurement(str(n), float(v), str(u))
                        for n, v, u in json.loads(row["measurements"])
                    ),
                )
            )
    if first is not None:
        yield _run_from_row(first, tuple(found))


def _run_from_row(row: Any, found: tuple[FindingRecord, ...]) -> ModelRun:
    return ModelRun(
        id=row["id"],
        kind=row["kind"],
        subject=row["subject"],
        study_key=row["study_key"],
        accession_ref=row["accession_ref"],
        modality=row["modality"],
        body_part=row["body_part"],
        model=row["model"],
        model_version=row["model_version"],
        weights_sha256=row["weights_sha256"],
        route=row["route"],
        report_status=row["report_status"],
        concepts=tuple(json.loads(row["concepts"])),
        received_at=row["received_at"],
        complete_at=row["complete_at"],
        inferred_at=row["inferred_at"],
        delivered_at=row["delivered_at"],
        findings=found,
    )
