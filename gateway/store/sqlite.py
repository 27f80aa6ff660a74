"""The embedded queue: SQLite in WAL mode with ``synchronous=FULL``.

A commit returns only after the WAL is fsync'd, so a row that was committed survives a
``kill -9`` or a power cut.  One connection per process, serialised by a lock (SQLite
allows one writer at a time anyway); several processes share the file with a busy timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.envelope import (
    Envelope,
    Job,
    Kind,
    NextJob,
    Payload,
    PayloadError,
    RoutePayload,
    Stage,
    payload_json,
)
from gateway.errors import QueueUnavailable
from gateway.store import findings
from gateway.store.findings import ModelRun, RunFilter
from gateway.store.queue import (
    CLOCK_SLACK,
    JOB_GROUPS,
    JOBS_SINCE,
    RECENT_STUDIES,
    SUPERSEDED,
    Ack,
    JobGroup,
    LeaseLost,
    PurgedRows,
    StudyInfo,
    StudyTimeline,
    plan_purge,
    storable_job_ids,
    study_timelines,
)
from gateway.store.spool import SPOOL_KEY

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('dicom', 'hl7')),
    source       TEXT NOT NULL,
    received_at  REAL NOT NULL,
    dedup_key    TEXT NOT NULL UNIQUE,
    spool_key    TEXT,
    inline_blob  BLOB,
    study_key    TEXT,
    size         INTEGER NOT NULL,
    attrs        BLOB NOT NULL,
    ack          BLOB,
    late         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS envelopes_study ON envelopes (study_key);
CREATE TABLE IF NOT EXISTS studies (
    study_key     TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('open', 'complete')),
    first_at      REAL NOT NULL,
    last_at       REAL NOT NULL,
    complete_due  REAL NOT NULL,
    completed_at  REAL,
    instances     INTEGER NOT NULL DEFAULT 0,
    generation    INTEGER NOT NULL DEFAULT 1,
    reopened      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (state, complete_due);
CREATE TABLE IF NOT EXISTS jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    stage          TEXT NOT NULL,
    subject        TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
    run_at         REAL NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    lease_token    TEXT,
    lease_expires  REAL,
    worker         TEXT,
    last_error     TEXT,
    payload        TEXT NOT NULL DEFAULT '{}',
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    lane           TEXT NOT NULL DEFAULT '',
    first_failed_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, stage, run_at);
-- deliveries go by lane (one per destination): a destination that is down delays no other
CREATE INDEX IF NOT EXISTS jobs_lane ON jobs (state, lane, run_at);
-- one waiting job per (stage, subject): a study completed twice before routing is routed once
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_ready ON jobs (stage, subject) WHERE state = 'ready';
-- a study's other identifiers (keyed hashes of the accession number): a report that
-- names its study by accession finds the stored study
CREATE TABLE IF NOT EXISTS study_refs (
    ref        TEXT PRIMARY KEY,
    study_key  TEXT NOT NULL
);
-- which stored objects reached which destination: a retried delivery skips them
CREATE TABLE IF NOT EXISTS deliveries (
    envelope_id   TEXT NOT NULL,
    destination   TEXT NOT NULL,
    delivered_at  REAL NOT NULL,
    status        INTEGER NOT NULL,
    PRIMARY KEY (envelope_id, destination)
);
"""

# Upgrades of an existing database, by the version they produce.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE jobs ADD COLUMN lane TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN first_failed_at REAL",
    ],
    3: [],  # study_refs: a new table, created by SCHEMA
    4: [],  # ai_runs, ai_findings: new tables (gateway/store/findings.py), created with SCHEMA
}


def schema_version(path: Path) -> int | None:
    """The schema version of the queue file at *path*, read without changing anything;
    None when there is no file yet, or it holds no queue."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise QueueUnavailable(f"cannot read the queue database {path}: {exc}") from exc
    return None if row is None else int(row[0])


def migrate(path: Path) -> list[int]:
    """Create the queue file, or upgrade it to :data:`SCHEMA_VERSION`, as opening it does;
    the versions this applied ([] when it was up to date)."""
    before = schema_version(path)
    SQLiteQueue(path).close()
    if before is None:
        return [SCHEMA_VERSION]
    return list(range(before + 1, SCHEMA_VERSION + 1))


def _still_done(db: sqlite3.Connection, study_key: str, cutoff: float) -> bool:
    row = db.execute(
        "SELECT state, last_at FROM studies WHERE study_key = ?", (study_key,)
    ).fetchone()
    return row is not None and row["state"] == "complete" and float(row["last_at"]) < cutoff


# A wall clock that stepped back leaves rows written "in the future" (queue.py): moved
# back by the step (how far ahead their last write lies), keeping what was left of each
# wait.  SQL evaluates every SET expression on the old row, so the order does not matter.
REBASE_STUDIES = (
    "UPDATE studies SET complete_due = complete_due - (last_at - :now), last_at = :now"
    " WHERE state = 'open' AND last_at > :now + :slack"
)
REBASE_JOBS = (
    "UPDATE jobs SET run_at = run_at - (updated_at - :now),"
    " lease_expires = lease_expires - (updated_at - :now), updated_at = :now"
    " WHERE state IN ('ready', 'leased') AND updated_at > :now + :slack"
)


def _delete_in(db: sqlite3.Connection, table: str, column: str, values: Sequence[Any]) -> None:
    for start in range(0, len(values), 500):
        part = list(values[start : start + 500])
        marks = ",".join("?" * len(part))
        db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", part)


_FIRST_PAUSE = 0.00005  # seconds: the first wait for another process's write transaction
_LONGEST_PAUSE = 0.002


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the write lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class SQLiteQueue:
    """The :class:`~gateway.store.queue.Queue` on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        durable: bool = True,
        lock: threading.Lock | None = None,
    ) -> None:
        """*durable*: every commit is fsync'd before it returns (what the ingest edges need
        before they acknowledge).  ``durable=False`` is for workers' bookkeeping (leases,
        completions, next jobs, delivery records): a power cut can lose their last commits,
        which only makes a job run again (delivery is at least once), and any later durable
        commit syncs them too.  Pass the durable queue's :attr:`lock` so both connections
        take turns in-process instead of in SQLite's coarse busy-wait."""
        self.path = path
        self._busy_timeout = busy_timeout
        self._durable = durable
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock or threading.Lock()
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._init_schema()

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def _init_schema(self) -> None:
        """Create the schema, or upgrade an older one, in one transaction."""
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = SCHEMA_VERSION if row is None else int(row["value"])
            if version > SCHEMA_VERSION:
                raise QueueUnavailable(
                    f"queue database {self.path} has schema {version}, newer than this "
                    f"gateway's {SCHEMA_VERSION}: run the newer gateway version"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    db.execute(statement)
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for statement in findings.schema(postgres=False):
                db.execute(statement)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT (durable on return)."""
        with self._lock:
            self._begin()
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                raise QueueUnavailable(f"queue database cannot be written: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting for another process's write transaction in short steps.

        SQLite's own busy handler (``busy_timeout``) sleeps 1, 2, 5, 10, 15, 20, 25 ... ms
        between tries, so another process's transaction that ends 50 us later still costs
        this one a millisecond or more: with the MLLP listener and the workers in separate
        processes on one file, those sleeps were the acknowledgement path's p99.  Here the
        connection does not wait inside SQLite (``busy_timeout`` 0 for the BEGIN only) and
        tries again after 50 us, doubling to at most 2 ms, until the same
        :attr:`busy_timeout` has passed; then the queue is busy (a transient error).

        Only the durable connections (the ingest edges) do so; the workers' bookkeeping
        keeps SQLite's backing-off handler, so that where both wait for the lock, the
        acknowledgement path gets it first (measured: retrying fast on the workers' side
        too cost the MLLP listener a third of its messages per second)."""
        if not self._durable:  # the workers' bookkeeping yields to the ingest edges
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise QueueUnavailable(f"queue database is busy: {exc}") from exc
            return
        deadline = time.monotonic() + self._busy_timeout
        pause = _FIRST_PAUSE
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or time.monotonic() >= deadline:
                        raise QueueUnavailable(f"queue database is busy: {exc}") from exc
                time.sleep(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    # --- ingest ------------------------------------------------------------------------

    def _insert_envelope(
        self,
        db: sqlite3.Connection,
        env: Envelope,
        attrs: bytes,
        inline: bytes | None,
        ack: bytes | None,
    ) -> sqlite3.Row | None:
        cur = db.execute(
            "INSERT INTO envelopes (id, kind, source, received_at, dedup_key, spool_key,"
            " inline_blob, study_key, size, attrs, ack) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            (
                env.id,
                env.kind.value,
                env.source,
                env.received_at,
                env.dedup_key,
                env.spool_key,
                inline,
                env.study_key,
                env.size,
                attrs,
                ack,
            ),
        )
        row = cur.fetchone()
        if row is not None:
            return None
        existing: sqlite3.Row | None = db.execute(
            "SELECT id, ack FROM envelopes WHERE dedup_key = ?", (env.dedup_key,)
        ).fetchone()
        return existing

    def record_instance(
        self, env: Envelope, sealed_attrs: bytes, quiet: float, inline: bytes | None = None
    ) -> Ack:
        """Record a received DICOM instance and (re)start its study's quiet-period timer."""
        assert env.study_key is not None
        now = env.received_at
        with self._tx() as db:
            existing = self._insert_envelope(db, env, sealed_attrs, inline, None)
            if existing is not None:
                return Ack(new=False, envelope_id=existing["id"])
            row = db.execute(
                "SELECT state FROM studies WHERE study_key = ?", (env.study_key,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO studies (study_key, state, first_at, last_at, complete_due,"
                    " instances) VALUES (?, 'open', ?, ?, ?, 1)",
                    (env.study_key, now, now, now + quiet),
                )
            else:
                late = row["state"] == "complete"
                db.execute(
                    "UPDATE studies SET state = 'open', last_at = ?, complete_due = ?,"
                    " instances = instances + 1,"
                    " generation = generation + ?, reopened = reopened OR ?"
                    " WHERE study_key = ?",
                    (now, now + quiet, int(late), int(late), env.study_key),
                )
                if late:
                    db.execute("UPDATE envelopes SET late = 1 WHERE id = ?", (env.id,))
        return Ack(new=True, envelope_id=env.id)

    def touch_study(self, study_key: str, now: float, quiet: float) -> None:
        """An instance of the study was received again: its quiet-period timer restarts,
        and a complete study is reopened (so it is routed, and its models run, again:
        results with the same UIDs replace the earlier ones)."""
        with self._tx() as db:
            db.execute(
                "UPDATE studies SET last_at = ?, complete_due = ?,"
                " generation = generation + (state = 'complete'),"
                " reopened = reopened OR (state = 'complete'), state = 'open'"
                " WHERE study_key = ?",
                (now, now + quiet, study_key),
            )

    def record_message(
        self, env: Envelope, sealed_message: bytes, sealed_attrs: bytes, ack: bytes
    ) -> Ack:
        """Record an HL7 message (kept encrypted in the row: one commit makes it durable)
        with the ACK it gets, and queue it for routing.  A resent message gets the stored ACK."""
        with self._tx() as db:
            existing = self._insert_envelope(db, env, sealed_attrs, sealed_message, ack)
            if existing is not None:
                return Ack(new=False, envelope_id=existing["id"], ack=existing["ack"])
            self._enqueue(
                db, Stage.ROUTE, env.id, env.received_at, RoutePayload(Kind.HL7), env.received_at
            )
        return Ack(new=True, envelope_id=env.id, ack=ack)

    # --- study assembly ----------------------------------------------------------------

    def complete_due_studies(self, now: float) -> list[str]:
        """Mark studies whose quiet period has passed complete and queue them for routing.
        First, open studies written after *now* (the clock stepped back) have their quiet
        periods moved back by the step (:data:`REBASE_STUDIES`)."""
        with self._tx() as db:
            db.execute(REBASE_STUDIES, {"now": now, "slack": CLOCK_SLACK})
            rows = db.execute(
                "SELECT study_key, generation, reopened FROM studies"
                " WHERE state = 'open' AND complete_due <= ? ORDER BY complete_due",
                (now,),
            ).fetchall()
            for row in rows:
                db.execute(
                    "UPDATE studies SET state = 'complete', completed_at = ? WHERE study_key = ?",
                    (now, row["study_key"]),
                )
                self._enqueue(
                    db,
                    Stage.ROUTE,
                    row["study_key"],
                    now,
                    RoutePayload(Kind.DICOM, row["generation"], bool(row["reopened"])),
                    now,
                )
        return [r["study_key"] for r in rows]

    def study(self, study_key: str) -> StudyInfo | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM studies WHERE study_key = ?", (study_key,)
            ).fetchone()
        if row is None:
            return None
        return StudyInfo(
            study_key=row["study_key"],
            state=row["state"],
            instances=row["instances"],
            generation=row["generation"],
            reopened=bool(row["reopened"]),
            last_at=row["last_at"],
            complete_due=row["complete_due"],
        )

    def next_study_due(self) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(complete_due) AS due FROM studies WHERE state = 'open'"
            ).fetchone()
        return None if row["due"] is None else float(row["due"])

    # --- jobs --------------------------------------------------------------------------

    def _enqueue(
        self,
        db: sqlite3.Connection,
        stage: Stage,
        subject: str,
        run_at: float,
        payload: Payload,
        now: float,
        lane: str = "",
    ) -> int:
        row = db.execute(
            "INSERT INTO jobs (stage, subject, state, run_at, payload, created_at, updated_at,"
            " lane) VALUES (?, ?, 'ready', ?, ?, ?, ?, ?)"
            " ON CONFLICT (stage, subject) WHERE state = 'ready'"
            " DO UPDATE SET payload = excluded.payload, updated_at = excluded.updated_at,"
            " run_at = MIN(run_at, excluded.run_at)"
            " RETURNING id",
            (stage.value, subject, run_at, payload_json(payload), now, now, lane),
        ).fetchone()
        return int(row["id"])

    def enqueue(
        self,
        stage: Stage,
        subject: str,
        run_at: float,
        payload: Payload,
        *,
        lane: str = "",
    ) -> int:
        with self._tx() as db:
            return self._enqueue(db, stage, subject, run_at, payload, run_at, lane)

    def lease(
        self,
        stages: list[Stage],
        worker: str,
        seconds: float,
        now: float,
        *,
        lane: str | None = None,
        alone: bool = False,
    ) -> Job | None:
        """Take the next ready job of the given stages (and *lane*, when given) in one
        statement: no gap between choosing and taking.  *alone*: only while no job of the
        lane is leased (writers take turns, so the check and the take cannot interleave)."""
        marks = ",".join("?" for _ in stages)
        lane_sql = ""
        lane_params: tuple[str, ...] = ()
        if lane is not None:
            lane_sql, lane_params = "AND lane = ?", (lane,)
        if alone and lane is not None:
            lane_sql += " AND NOT EXISTS (SELECT 1 FROM jobs l WHERE l.lane = ?"
            lane_sql += " AND l.state = 'leased')"
            lane_params = (lane, lane)
        token = secrets.token_hex(8)
        with self._tx() as db:
            while True:
                row = db.execute(
                    "UPDATE jobs SET state = 'leased', lease_token = ?, lease_expires = ?,"
                    " worker = ?, attempts = attempts + 1, updated_at = ?"
                    " WHERE id = (SELECT id FROM jobs WHERE state = 'ready'"
                    f" AND stage IN ({marks}) {lane_sql} AND run_at <= ?"
                    " ORDER BY run_at, id LIMIT 1)"
                    " RETURNING *",
                    (
                        token,
                        now + seconds,
                        worker,
                        now,
                        *[s.value for s in stages],
                        *lane_params,
                        now,
                    ),
                ).fetchone()
                if row is None:
                    return None
                job = Job.from_row(row)
                try:
                    job.payload  # noqa: B018 (read now: a job no worker can read is dead)
                    return job
                except PayloadError as exc:  # no worker can run it: a dead letter saying why
                    db.execute(
                        "UPDATE jobs SET state = 'dead', lease_token = NULL, last_error = ?"
                        " WHERE id = ?",
                        (f"unreadable job payload: {exc}"[:2000], row["id"]),
                    )

    def _guarded(self, job: Job, sql: str, params: tuple[Any, ...]) -> sqlite3.Row:
        with self._tx() as db:
            row: sqlite3.Row | None = db.execute(
                sql + " WHERE id = ? AND state = 'leased' AND lease_token = ? RETURNING *",
                (*params, job.id, job.lease_token),
            ).fetchone()
        if row is None:
            raise LeaseLost(f"job {job.id} ({job.stage}) is no longer leased by this worker")
        return row

    def heartbeat(self, job: Job, seconds: float, now: float) -> Job:
        return Job.from_row(
            self._guarded(
                job, "UPDATE jobs SET lease_expires = ?, updated_at = ?", (now + seconds, now)
            )
        )

    def complete(
        self,
        job: Job,
        now: float,
        then: Sequence[NextJob] = (),
        *,
        run: ModelRun | None = None,
        delivered: tuple[str, str] | None = None,
    ) -> None:
        """Mark the job done and enqueue the jobs that follow from it, in one transaction:
        a crash leaves either both or neither.  With them, a model *run* is written to the
        findings store, or a run's result marked *delivered* ((model, subject))."""
        with self._tx() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET state = 'done', lease_token = NULL, updated_at = ? WHERE id = ?",
                (now, job.id),
            )
            for nxt in then:
                self._enqueue(
                    db, nxt.stage, nxt.subject, nxt.run_at or now, nxt.payload, now, nxt.lane
                )
            if run is not None:
                findings.insert_run(db.execute, run)
            if delivered is not None:
                model, subject = delivered
                db.execute(
                    findings.MARK_DELIVERED, {"now": now, "model": model, "subject": subject}
                )

    # --- the findings store ---------------------------------------------------------------

    def findings_runs(self, flt: RunFilter) -> list[ModelRun]:
        sql, params = findings.select_runs(flt)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return list(findings.runs_from_rows(rows))

    def findings_mark(self, since: float) -> tuple[int, float | None, float | None]:
        with self._lock:
            row = self._db.execute(findings.MARK, {"since": since}).fetchone()
        return int(row["n"]), row["oldest"], row["newest"]

    def purge_findings(self, cutoff: float, *, dry_run: bool = False) -> int:
        if dry_run:
            with self._lock:
                row = self._db.execute(findings.COUNT_PURGE, {"cutoff": cutoff}).fetchone()
            return int(row["n"])
        with self._tx() as db:
            db.execute(findings.PURGE_FINDINGS, {"cutoff": cutoff})
            return db.execute(findings.PURGE_RUNS, {"cutoff": cutoff}).rowcount

    def _make_ready(
        self,
        db: sqlite3.Connection,
        ids: list[int],
        set_sql: str,
        set_params: tuple[Any, ...],
        now: float,
    ) -> tuple[int, int]:
        """Move jobs *ids* back to 'ready'.  Only one job per (stage, subject) may wait
        (``jobs_one_ready``): the newest of them goes back unless a job for that subject is
        waiting already, and the others are closed as superseded (the waiting job does the
        same work, on newer data).  Returns (moved, superseded)."""
        if not ids:
            return 0, 0
        marks = ",".join("?" for _ in ids)
        moved = db.execute(
            f"UPDATE jobs SET state = 'ready', lease_token = NULL, {set_sql}, updated_at = ?"
            f" WHERE id IN ({marks})"
            f" AND id IN (SELECT MAX(id) FROM jobs WHERE id IN ({marks}) GROUP BY stage, subject)"
            " AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.stage = jobs.stage"
            " AND r.subject = jobs.subject AND r.state = 'ready')",
            (*set_params, now, *ids, *ids),
        ).rowcount
        superseded = db.execute(
            "UPDATE jobs SET state = 'done', lease_token = NULL, last_error = ?, updated_at = ?"
            f" WHERE id IN ({marks}) AND state != 'ready'",
            (SUPERSEDED, now, *ids),
        ).rowcount
        return moved, superseded

    def fail(self, job: Job, error: str, retry_at: float, now: float) -> None:
        """Back to 'ready' at *retry_at* with *error* kept (or superseded, see _make_ready)."""
        with self._tx() as db:
            self._check_lease(db, job)
            self._make_ready(
                db,
                [job.id],
                "run_at = ?, last_error = ?, first_failed_at = COALESCE(first_failed_at, ?)",
                (retry_at, error[:2000], now),
                now,
            )

    def dead(self, job: Job, error: str, now: float) -> None:
        self._guarded(
            job,
            "UPDATE jobs SET state = 'dead', lease_token = NULL, last_error = ?, updated_at = ?",
            (error[:2000], now),
        )

    def replay(self, job_ids: list[int] | None, now: float) -> int:
        """Put dead jobs back to ready (all of them when *job_ids* is None); return how many
        went back.  A dead job whose subject already has a waiting job is superseded."""
        with self._tx() as db:
            if job_ids is None:
                rows = db.execute("SELECT id FROM jobs WHERE state = 'dead'").fetchall()
            else:
                ids = storable_job_ids(job_ids)
                marks = ",".join("?" for _ in ids)
                rows = db.execute(
                    f"SELECT id FROM jobs WHERE state = 'dead' AND id IN ({marks})", ids
                ).fetchall()
            moved, _ = self._make_ready(
                db, [r["id"] for r in rows], "run_at = ?, attempts = 0", (now,), now
            )
            return moved

    def sweep_expired(self, now: float) -> int:
        """Return jobs whose lease expired (a crashed or stuck worker) to the ready state,
        to run now.  First, waiting and leased jobs written after *now* (the clock stepped
        back) are moved back by the step (:data:`REBASE_JOBS`)."""
        with self._tx() as db:
            db.execute(REBASE_JOBS, {"now": now, "slack": CLOCK_SLACK})
            rows = db.execute(
                "SELECT id FROM jobs WHERE state = 'leased' AND lease_expires < ?", (now,)
            ).fetchall()
            moved, superseded = self._make_ready(
                db,
                [r["id"] for r in rows],
                "worker = NULL, run_at = MIN(run_at, ?),"
                " last_error = COALESCE(last_error, 'lease expired')",
                (now,),
                now,
            )
            return moved + superseded

    def release_dead_workers(self, alive: Callable[[str], bool], now: float) -> int:
        """Return jobs leased by workers that no longer exist (*alive* says, by worker
        name) to the ready state at once, instead of waiting for their leases to expire:
        after a crash the restarted gateway resumes straight away."""
        with self._tx() as db:
            rows = db.execute("SELECT id, worker FROM jobs WHERE state = 'leased'").fetchall()
            dead = [r["id"] for r in rows if not alive(str(r["worker"] or ""))]
            moved, superseded = self._make_ready(
                db,
                dead,
                # it was due when it was leased: now, even if the clock stepped back since
                "worker = NULL, run_at = MIN(run_at, ?),"
                " last_error = COALESCE(last_error, 'worker died')",
                (now,),
                now,
            )
            return moved + superseded

    def _check_lease(self, db: sqlite3.Connection, job: Job) -> None:
        row = db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND state = 'leased' AND lease_token = ?",
            (job.id, job.lease_token),
        ).fetchone()
        if row is None:
            raise LeaseLost(f"job {job.id} ({job.stage}) is no longer leased by this worker")

    # --- deliveries ---------------------------------------------------------------------

    def record_delivery(self, envelope_id: str, destination: str, status: int, now: float) -> None:
        self.record_deliveries(destination, [(envelope_id, status)], now)

    def record_deliveries(
        self, destination: str, delivered: Sequence[tuple[str, int]], now: float
    ) -> None:
        """Record (envelope id, status) pairs that reached *destination*, in one commit."""
        if not delivered:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO deliveries (envelope_id, destination, delivered_at, status)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(envelope_id, destination, now, status) for envelope_id, status in delivered],
            )

    def delivered(self, destination: str, envelope_ids: Sequence[str]) -> set[str]:
        """Which of *envelope_ids* reached *destination* already."""
        if not envelope_ids:
            return set()
        marks = ",".join("?" for _ in envelope_ids)
        with self._lock:
            rows = self._db.execute(
                f"SELECT envelope_id FROM deliveries WHERE destination = ?"
                f" AND envelope_id IN ({marks})",
                (destination, *envelope_ids),
            ).fetchall()
        return {str(r["envelope_id"]) for r in rows}

    def record_study_refs(self, study_key: str, refs: list[str]) -> None:
        """Remember other identifiers of a study (the latest study with a ref wins)."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO study_refs (ref, study_key) VALUES (?, ?)"
                " ON CONFLICT (ref) DO UPDATE SET study_key = excluded.study_key",
                [(ref, study_key) for ref in refs],
            )

    def study_for_ref(self, ref: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT study_key FROM study_refs WHERE ref = ?", (ref,)
            ).fetchone()
        return None if row is None else str(row["study_key"])

    def study_envelopes(self, study_key: str) -> list[Envelope]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM envelopes WHERE study_key = ? ORDER BY received_at", (study_key,)
            ).fetchall()
        return [Envelope.from_row(r) for r in rows]

    # --- reading -----------------------------------------------------------------------

    def envelope(self, envelope_id: str) -> tuple[Envelope, bytes, bytes | None]:
        """An envelope with its sealed attributes and (HL7) sealed inline message."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM envelopes WHERE id = ?", (envelope_id,)
            ).fetchone()
        if row is None:
            raise KeyError(envelope_id)
        return Envelope.from_row(row), row["attrs"], row["inline_blob"]

    def find(self, dedup_key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM envelopes WHERE dedup_key = ?", (dedup_key,)
            ).fetchone()
        return None if row is None else str(row["id"])

    def envelopes(self, kind: Kind | None = None) -> list[Envelope]:
        with self._lock:
            if kind is None:
                rows = self._db.execute("SELECT * FROM envelopes ORDER BY received_at").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM envelopes WHERE kind = ? ORDER BY received_at", (kind.value,)
                ).fetchall()
        return [Envelope.from_row(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts for ``gateway queue status``: received objects, studies, jobs by stage/state."""
        with self._lock:
            out: dict[str, dict[str, int]] = {"received": {}, "studies": {}}
            for r in self._db.execute("SELECT kind, COUNT(*) n FROM envelopes GROUP BY kind"):
                out["received"][r["kind"]] = r["n"]
            for r in self._db.execute("SELECT state, COUNT(*) n FROM studies GROUP BY state"):
                out["studies"][r["state"]] = r["n"]
            for r in self._db.execute(
                "SELECT stage, state, COUNT(*) n FROM jobs GROUP BY stage, state"
            ):
                out.setdefault(f"jobs:{r['stage']}", {})[r["state"]] = r["n"]
        return out

    def oldest_ready_age(self, now: float) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(created_at) t FROM jobs WHERE state IN ('ready', 'leased')"
            ).fetchone()
        return None if row["t"] is None else now - float(row["t"])

    def oldest_waiting_by_lane(self, now: float) -> dict[str, float]:
        """Age of the oldest job not yet done, per lane ('' = routing and inference)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT lane, MIN(created_at) t FROM jobs WHERE state IN ('ready', 'leased')"
                " GROUP BY lane"
            ).fetchall()
        return {str(r["lane"]): now - float(r["t"]) for r in rows}

    def job_groups(self) -> list[JobGroup]:
        with self._lock:
            rows = self._db.execute(JOB_GROUPS).fetchall()
        return [
            JobGroup(
                r["stage"],
                r["lane"],
                r["state"],
                int(r["jobs"]),
                int(r["retried"]),
                float(r["oldest_created"]),
                float(r["newest_updated"]),
            )
            for r in rows
        ]

    def study_timelines(self, limit: int) -> list[StudyTimeline]:
        with self._lock:
            studies = [
                (r[0], r[1], int(r[2]), int(r[3]), float(r[4]), r[5])
                for r in self._db.execute(RECENT_STUDIES, {"limit": limit})
            ]
            since = min((s[4] for s in studies), default=None)
            jobs = (
                []
                if since is None
                else [
                    (r[0], r[1], r[2], float(r[3]))
                    for r in self._db.execute(JOBS_SINCE, {"since": since})
                ]
            )
        return study_timelines(studies, jobs)

    def job(self, job_id: int) -> Job | None:
        if not storable_job_ids([job_id]):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def dead_jobs(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state = 'dead' ORDER BY id"
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    # --- retention ----------------------------------------------------------------------

    def purge_rows(self, cutoff: float, *, dry_run: bool = False, chunk: int = 200) -> PurgedRows:
        """Delete what the gateway is done with and received before *cutoff*: complete
        studies and HL7 messages whose every job is done, with their envelopes, jobs,
        delivery records and accession references.  A study or message with a job that is
        waiting, running or dead is kept (a dead letter may still be replayed).

        Spool files are not touched here: their keys come back in ``spool_keys``, for the
        caller to remove once the rows are gone.  Deletes run in transactions of *chunk*
        subjects, so ingest waits for one short transaction at a time.
        """
        with self._lock:
            plan = plan_purge(
                (
                    str(r[0])
                    for r in self._db.execute("SELECT subject FROM jobs WHERE state != 'done'")
                ),
                [
                    str(r["study_key"])
                    for r in self._db.execute(
                        "SELECT study_key FROM studies WHERE state = 'complete' AND last_at < ?"
                        " ORDER BY last_at",
                        (cutoff,),
                    )
                ],
                [
                    str(r["id"])
                    for r in self._db.execute(
                        "SELECT id FROM envelopes WHERE kind = 'hl7' AND received_at < ?"
                        " ORDER BY received_at",
                        (cutoff,),
                    )
                ],
                (
                    (int(r["id"]), str(r["subject"]), str(r["payload"]))
                    for r in self._db.execute(
                        "SELECT id, subject, payload FROM jobs WHERE state = 'done'"
                    )
                ),
            )
        if dry_run:
            return plan.dry_run(self._first_attrs, self.study_envelopes)
        out, jobs, keys = plan.rows, plan.jobs, plan.keys
        ordered = [*out.studies, *out.messages]
        study_keys = set(out.studies)
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            with self._tx() as db:
                for target in part:
                    if target in study_keys and not _still_done(db, target, cutoff):
                        # sent again since the snapshot: it is being processed again
                        out.studies.remove(target)
                        out.kept += 1
                        continue
                    rows = db.execute(
                        "SELECT id, attrs, spool_key FROM envelopes"
                        " WHERE study_key = ? OR id = ? ORDER BY received_at",
                        (target, target),
                    ).fetchall()
                    envs = [(str(r["id"]), bytes(r["attrs"])) for r in rows]
                    out.spool_keys += [str(r["spool_key"]) for r in rows if r["spool_key"]]
                    out.spool_keys += keys.get(target, [])
                    if target in study_keys and envs:
                        out.study_attrs.append((envs[0][0], envs[0][1]))
                    ids = [e[0] for e in envs]
                    _delete_in(db, "deliveries", "envelope_id", ids)
                    _delete_in(db, "envelopes", "id", ids)
                    _delete_in(db, "jobs", "id", jobs.get(target, []))
                    db.execute("DELETE FROM study_refs WHERE study_key = ?", (target,))
                    db.execute("DELETE FROM studies WHERE study_key = ?", (target,))
                    out.envelopes += len(ids)
        return out

    def _first_attrs(self, study_key: str) -> tuple[str, bytes]:
        with self._lock:
            row = self._db.execute(
                "SELECT id, attrs FROM envelopes WHERE study_key = ? ORDER BY received_at",
                (study_key,),
            ).fetchone()
        return ("", b"") if row is None else (str(row["id"]), bytes(row["attrs"]))

    def referenced_spool_keys(self) -> set[str]:
        """Every spool key a row still names: envelopes' objects, and the results, masks,
        crosswalks and built objects that jobs carry in their payloads."""
        with self._lock:
            keys = {
                str(r["spool_key"])
                for r in self._db.execute(
                    "SELECT spool_key FROM envelopes WHERE spool_key IS NOT NULL"
                )
            }
            for r in self._db.execute("SELECT payload FROM jobs"):
                keys.update(SPOOL_KEY.findall(str(r["payload"])))
        return keys

    def sealed_blobs(self) -> Iterator[bytes]:
        """The sealed values kept in rows (attributes, inline HL7 messages, their ACKs): for
        finding which data keys are still in use."""
        with self._lock:
            rows = self._db.execute(
                "SELECT substr(attrs, 1, 64) AS a, substr(inline_blob, 1, 64) AS b,"
                " substr(ack, 1, 64) AS c FROM envelopes"
            ).fetchall()
        for r in rows:
            for value in (r["a"], r["b"], r["c"]):
                if value is not None:
                    yield bytes(value)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A lock file beside the database (``queue.sqlite3.NAME.lock``), taken with
        ``flock`` without waiting: one process of this node at a time (SQLite serves one
        node; the lock goes with the process if it dies)."""
        path = self.path.with_name(f"{self.path.name}.{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._db.close()
