"""The shared queue: PostgreSQL, for any number of gateway nodes on one database.

The same :class:`~gateway.store.queue.Queue` contract as :mod:`gateway.store.sqlite`, with
the database doing the coordination:

- **Durable ingest.** ``synchronous_commit`` stays on (the server's default) for the ingest
  methods: a commit returns after the WAL is flushed.  ``durable=False`` turns it off for
  the other transactions of that queue (workers' bookkeeping: leases, completions, next
  jobs, deliveries): a crash of the *server* can lose their last commits, which only makes
  a job run again; the database itself stays consistent.
- **Leases in one statement.** ``UPDATE jobs ... WHERE id = (SELECT id ... ORDER BY run_at,
  id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *``: two workers never take the same job and
  never wait on each other's row locks.
- **Guarded transitions.** Every change of a leased job is "this id, leased, with this
  token", under a row lock; no row means :class:`~gateway.store.queue.LeaseLost`.
- **Wake-ups without polling.** A trigger sends ``NOTIFY gateway_jobs, '<stage>'`` in the
  transaction that makes a job ready (enqueue, next jobs, fail, replay, sweep), delivered
  at its commit; :meth:`PostgresQueue.wait_for_jobs` blocks on a LISTEN connection.
- **Versioned schema.** :data:`MIGRATIONS` in order, the version in ``meta`` (key
  ``schema``, as SQLite keeps it); :func:`migrate` applies what is missing in one
  transaction under an advisory lock, so nodes starting together migrate once.

All SQL is in :data:`MIGRATIONS` and :data:`SQL` below, by name.  Connection failures and
operational errors are :class:`~gateway.errors.QueueUnavailable`, naming the server (host
and port, never the password).
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

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

T = TypeVar("T")
Cursor = psycopg.Cursor[DictRow]

#: the channel a job that became ready is announced on (the payload: its stage)
CHANNEL = "gateway_jobs"
#: pg_advisory_xact_lock key of schema migrations (any constant: 'gw-schema' as bytes)
MIGRATION_LOCK = 0x67772D736368656D
#: seconds to wait for a connection before the queue is reported unavailable
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Migration:
    version: int
    summary: str
    statements: tuple[str, ...]


# --- schema, by version ----------------------------------------------------------------
# Version 1 is SQLite's schema 3 (gateway/store/sqlite.py) on PostgreSQL types: REAL ->
# double precision, BLOB -> bytea, INTEGER PRIMARY KEY AUTOINCREMENT -> identity, and
# the same CHECK constraints.  0/1 flags stay integers, as in SQLite.

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "the queue schema: envelopes, studies, jobs, study_refs, deliveries; job wake-ups",
        (
            "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
            """CREATE TABLE envelopes (
    id           text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('dicom', 'hl7')),
    source       text NOT NULL,
    received_at  double precision NOT NULL,
    dedup_key    text NOT NULL UNIQUE,
    spool_key    text,
    inline_blob  bytea,
    study_key    text,
    size         bigint NOT NULL,
    attrs        bytea NOT NULL,
    ack          bytea,
    late         integer NOT NULL DEFAULT 0
)""",
            "CREATE INDEX envelopes_study ON envelopes (study_key)",
            """CREATE TABLE studies (
    study_key     text PRIMARY KEY,
    state         text NOT NULL CHECK (state IN ('open', 'complete')),
    first_at      double precision NOT NULL,
    last_at       double precision NOT NULL,
    complete_due  double precision NOT NULL,
    completed_at  double precision,
    instances     integer NOT NULL DEFAULT 0,
    generation    integer NOT NULL DEFAULT 1,
    reopened      integer NOT NULL DEFAULT 0
)""",
            "CREATE INDEX studies_due ON studies (state, complete_due)",
            """CREATE TABLE jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stage           text NOT NULL,
    subject         text NOT NULL,
    state           text NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
    run_at          double precision NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    lease_token     text,
    lease_expires   double precision,
    worker          text,
    last_error      text,
    payload         text NOT NULL DEFAULT '{}',
    created_at      double precision NOT NULL,
    updated_at      double precision NOT NULL,
    lane            text NOT NULL DEFAULT '',
    first_failed_at double precision
)""",
            "CREATE INDEX jobs_ready ON jobs (state, stage, run_at)",
            # deliveries go by lane (one per destination): a destination that is down
            # delays no other
            "CREATE INDEX jobs_lane ON jobs (state, lane, run_at)",
            # one waiting job per (stage, subject): a study completed twice before routing
            # is routed once
            "CREATE UNIQUE INDEX jobs_one_ready ON jobs (stage, subject) WHERE state = 'ready'",
            # a study's other identifiers (keyed hashes of the accession number)
            "CREATE TABLE study_refs (ref text PRIMARY KEY, study_key text NOT NULL)",
            # which stored objects reached which destination: a retried delivery skips them
            """CREATE TABLE deliveries (
    envelope_id   text NOT NULL,
    destination   text NOT NULL,
    delivered_at  double precision NOT NULL,
    status        integer NOT NULL,
    PRIMARY KEY (envelope_id, destination)
)""",
            # a job that becomes ready is announced at commit: idle workers wake at once
            f"""CREATE FUNCTION gateway_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.stage);
    RETURN NULL;
END
$$""",
            "CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs FOR EACH ROW"
            " WHEN (NEW.state = 'ready') EXECUTE FUNCTION gateway_jobs_notify()",
        ),
    ),
    Migration(
        2,
        "a received instance recorded in one round trip: gateway_record_instance()",
        (
            # What record_instance did in four statements (each a round trip, plus BEGIN
            # and COMMIT): the envelope (nothing on a duplicate), its study row locked or
            # made, the quiet period restarted, a late instance marked.  Called alone, it
            # is one transaction.
            """CREATE FUNCTION gateway_record_instance(
    p_id text, p_source text, p_received double precision, p_dedup text, p_spool text,
    p_inline bytea, p_study text, p_size bigint, p_attrs bytea, p_quiet double precision
) RETURNS TABLE (envelope_id text, new boolean) LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    INSERT INTO envelopes (id, kind, source, received_at, dedup_key, spool_key,
                           inline_blob, study_key, size, attrs)
    VALUES (p_id, 'dicom', p_source, p_received, p_dedup, p_spool, p_inline, p_study,
            p_size, p_attrs)
    ON CONFLICT (dedup_key) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT e.id, false FROM envelopes e WHERE e.dedup_key = p_dedup;
        RETURN;
    END IF;
    LOOP  -- the study row, locked; or a new one (another node may race us)
        SELECT s.state INTO v_state FROM studies s WHERE s.study_key = p_study FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO studies (study_key, state, first_at, last_at, complete_due, instances)
        VALUES (p_study, 'open', p_received, p_received, p_received + p_quiet, 1)
        ON CONFLICT (study_key) DO NOTHING;
        IF FOUND THEN
            RETURN QUERY SELECT p_id, true;
            RETURN;
        END IF;
    END LOOP;
    UPDATE studies SET state = 'open', last_at = p_received,
        complete_due = p_received + p_quiet, instances = instances + 1,
        generation = generation + (v_state = 'complete')::integer,
        reopened = GREATEST(reopened, (v_state = 'complete')::integer)
    WHERE study_key = p_study;
    IF v_state = 'complete' THEN
        UPDATE envelopes SET late = 1 WHERE id = p_id;
    END IF;
    RETURN QUERY SELECT p_id, true;
END
$$""",
        ),
    ),
    Migration(
        3,
        "the findings store: ai_runs, ai_findings (gateway/store/findings.py)",
        tuple(findings.schema(postgres=True)),
    ),
    Migration(
        4,
        "a received HL7 message recorded in one round trip: gateway_record_message()",
        (
            # What record_message did in two statements inside BEGIN/COMMIT (four round
            # trips): the envelope, sealed message and ACK in its row (or, on a resend,
            # the stored id and ACK), and its route job.  Called alone, one transaction.
            """CREATE FUNCTION gateway_record_message(
    p_id text, p_source text, p_received double precision, p_dedup text, p_inline bytea,
    p_size bigint, p_attrs bytea, p_ack bytea, p_payload text
) RETURNS TABLE (envelope_id text, new boolean, ack bytea) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO envelopes (id, kind, source, received_at, dedup_key, spool_key,
                           inline_blob, study_key, size, attrs, ack)
    VALUES (p_id, 'hl7', p_source, p_received, p_dedup, NULL, p_inline, NULL, p_size,
            p_attrs, p_ack)
    ON CONFLICT (dedup_key) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT e.id, false, e.ack FROM envelopes e WHERE e.dedup_key = p_dedup;
        RETURN;
    END IF;
    INSERT INTO jobs (stage, subject, state, run_at, payload, created_at, updated_at, lane)
    VALUES ('route', p_id, 'ready', p_received, p_payload, p_received, p_received, '');
    RETURN QUERY SELECT p_id, true, p_ack;
END
$$""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


@functools.cache
def _pg(sql: str) -> str:
    """A findings statement (written with ``:name`` parameters) in psycopg's style."""
    return findings.pg(sql)


# --- every statement the engine runs, by name ------------------------------------------

_MAKE_READY = (
    # the newest job of each (stage, subject) goes back, unless one is waiting already
    "UPDATE jobs SET state = 'ready', lease_token = NULL, {set}, updated_at = %(now)s"
    " WHERE id = ANY(%(ids)s::bigint[])"
    " AND id IN (SELECT MAX(id) FROM jobs WHERE id = ANY(%(ids)s::bigint[])"
    " GROUP BY stage, subject)"
    " AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.stage = jobs.stage"
    " AND r.subject = jobs.subject AND r.state = 'ready')"
)

SQL: dict[str, str] = {
    # schema
    # a catalog read under the statement's snapshot (to_regclass would trust a cache that
    # misses a table another node created while we waited for the lock)
    "schema_table": "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables"
    " WHERE schemaname = current_schema() AND tablename = 'meta') AS present",
    "schema_version": "SELECT value FROM meta WHERE key = 'schema'",
    "schema_lock": "SELECT pg_advisory_xact_lock(%s)",
    "schema_set": "INSERT INTO meta (key, value) VALUES ('schema', %s)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    # sessions
    "bookkeeping_commit": "SET synchronous_commit = off",
    "durable_commit": "SET LOCAL synchronous_commit = on",
    "listen": f"LISTEN {CHANNEL}",
    # site-wide singletons (a retention pass): a session lock, gone with its connection
    "try_lock": "SELECT pg_try_advisory_lock(hashtext('gateway:' || %s)) AS held",
    "unlock": "SELECT pg_advisory_unlock(hashtext('gateway:' || %s))",
    # ingest
    "record_instance": "SELECT envelope_id, new FROM gateway_record_instance(%(id)s,"
    " %(source)s, %(received)s, %(dedup)s, %(spool)s, %(inline)s, %(study)s, %(size)s,"
    " %(attrs)s, %(quiet)s)",
    "record_message": "SELECT envelope_id, new, ack FROM gateway_record_message(%(id)s,"
    " %(source)s, %(received)s, %(dedup)s, %(inline)s, %(size)s, %(attrs)s, %(ack)s,"
    " %(payload)s)",
    "touch_study": "UPDATE studies SET last_at = %(now)s, complete_due = %(due)s,"
    " generation = generation + (state = 'complete')::integer,"
    " reopened = GREATEST(reopened, (state = 'complete')::integer), state = 'open'"
    " WHERE study_key = %(study)s",
    # study assembly
    "due_studies": "SELECT study_key, generation, reopened FROM studies"
    " WHERE state = 'open' AND complete_due <= %s ORDER BY complete_due"
    " FOR UPDATE SKIP LOCKED",
    "complete_study": "UPDATE studies SET state = 'complete', completed_at = %s"
    " WHERE study_key = %s",
    # the wall clock stepped back: rows written "in the future" are moved back by the step
    # (gateway/store/queue.py), each wait keeping what was left of it; rows another
    # transaction holds are left for the next call
    "rebase_studies": "UPDATE studies SET complete_due = complete_due - (last_at - %(now)s),"
    " last_at = %(now)s WHERE study_key IN (SELECT study_key FROM studies"
    " WHERE state = 'open' AND last_at > %(now)s + %(slack)s FOR UPDATE SKIP LOCKED)",
    "study": "SELECT * FROM studies WHERE study_key = %s",
    "next_study_due": "SELECT MIN(complete_due) AS due FROM studies WHERE state = 'open'",
    "record_study_ref": "INSERT INTO study_refs (ref, study_key) VALUES (%s, %s)"
    " ON CONFLICT (ref) DO UPDATE SET study_key = excluded.study_key",
    "study_for_ref": "SELECT study_key FROM study_refs WHERE ref = %s",
    "study_envelopes": "SELECT * FROM envelopes WHERE study_key = %s ORDER BY received_at",
    "first_attrs": "SELECT id, attrs FROM envelopes WHERE study_key = %s"
    " ORDER BY received_at LIMIT 1",
    # jobs
    "enqueue": "INSERT INTO jobs (stage, subject, state, run_at, payload, created_at,"
    " updated_at, lane) VALUES (%(stage)s, %(subject)s, 'ready', %(run_at)s, %(payload)s,"
    " %(now)s, %(now)s, %(lane)s)"
    " ON CONFLICT (stage, subject) WHERE state = 'ready'"
    " DO UPDATE SET payload = excluded.payload, updated_at = excluded.updated_at,"
    " run_at = LEAST(jobs.run_at, excluded.run_at)"
    " RETURNING id",
    "lease": "UPDATE jobs SET state = 'leased', lease_token = %(token)s,"
    " lease_expires = %(expires)s, worker = %(worker)s, attempts = attempts + 1,"
    " updated_at = %(now)s"
    " WHERE id = (SELECT id FROM jobs WHERE state = 'ready'"
    " AND stage = ANY(%(stages)s::text[]) AND run_at <= %(now)s"
    " ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING *",
    "lease_in_lane": "UPDATE jobs SET state = 'leased', lease_token = %(token)s,"
    " lease_expires = %(expires)s, worker = %(worker)s, attempts = attempts + 1,"
    " updated_at = %(now)s"
    " WHERE id = (SELECT id FROM jobs WHERE state = 'ready'"
    " AND stage = ANY(%(stages)s::text[]) AND lane = %(lane)s AND run_at <= %(now)s"
    " ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING *",
    # a lane that takes one delivery at a time: lease attempts in it take turns (the lock
    # goes with the transaction) and take a job only while none of the lane is leased
    "lock_lane": "SELECT pg_advisory_xact_lock(hashtext('gateway-lane:' || %(lane)s))",
    "lease_in_lane_alone": "UPDATE jobs SET state = 'leased', lease_token = %(token)s,"
    " lease_expires = %(expires)s, worker = %(worker)s, attempts = attempts + 1,"
    " updated_at = %(now)s"
    " WHERE id = (SELECT id FROM jobs WHERE state = 'ready'"
    " AND stage = ANY(%(stages)s::text[]) AND lane = %(lane)s AND run_at <= %(now)s"
    " AND NOT EXISTS (SELECT 1 FROM jobs l WHERE l.lane = %(lane)s AND l.state = 'leased')"
    " ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
    " RETURNING *",
    "dead_letter_unreadable": "UPDATE jobs SET state = 'dead', lease_token = NULL,"
    " last_error = %s WHERE id = %s AND lease_token = %s",
    "check_lease": "SELECT 1 FROM jobs WHERE id = %s AND state = 'leased'"
    " AND lease_token = %s FOR UPDATE",
    "heartbeat": "UPDATE jobs SET lease_expires = %s, updated_at = %s"
    " WHERE id = %s AND state = 'leased' AND lease_token = %s RETURNING *",
    "complete": "UPDATE jobs SET state = 'done', lease_token = NULL, updated_at = %s"
    " WHERE id = %s AND state = 'leased' AND lease_token = %s RETURNING id",
    "dead": "UPDATE jobs SET state = 'dead', lease_token = NULL, last_error = %s,"
    " updated_at = %s WHERE id = %s AND state = 'leased' AND lease_token = %s RETURNING id",
    "ready_after_fail": _MAKE_READY.format(
        set="run_at = %(run_at)s, last_error = %(error)s,"
        " first_failed_at = COALESCE(first_failed_at, %(now)s)"
    ),
    "ready_after_replay": _MAKE_READY.format(set="run_at = %(now)s, attempts = 0"),
    # a job whose lease is taken back was due when it was leased: it runs now, even if
    # the clock stepped back since
    "ready_after_expiry": _MAKE_READY.format(
        set="worker = NULL, run_at = LEAST(run_at, %(now)s),"
        " last_error = COALESCE(last_error, 'lease expired')"
    ),
    "ready_after_worker_died": _MAKE_READY.format(
        set="worker = NULL, run_at = LEAST(run_at, %(now)s),"
        " last_error = COALESCE(last_error, 'worker died')"
    ),
    "rebase_jobs": "UPDATE jobs SET run_at = run_at - (updated_at - %(now)s),"
    " lease_expires = lease_expires - (updated_at - %(now)s), updated_at = %(now)s"
    " WHERE id IN (SELECT id FROM jobs WHERE state IN ('ready', 'leased')"
    " AND updated_at > %(now)s + %(slack)s FOR UPDATE SKIP LOCKED)",
    "supersede": "UPDATE jobs SET state = 'done', lease_token = NULL, last_error = %(error)s,"
    " updated_at = %(now)s WHERE id = ANY(%(ids)s::bigint[]) AND state != 'ready'",
    "dead_ids_for_update": "SELECT id FROM jobs WHERE state = 'dead' ORDER BY id FOR UPDATE",
    "listed_dead_ids_for_update": "SELECT id FROM jobs WHERE state = 'dead'"
    " AND id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE",
    "expired_ids_for_update": "SELECT id FROM jobs WHERE state = 'leased'"
    " AND lease_expires < %s ORDER BY id FOR UPDATE",
    "leased_for_update": "SELECT id, worker FROM jobs WHERE state = 'leased'"
    " ORDER BY id FOR UPDATE",
    "job": "SELECT * FROM jobs WHERE id = %s",
    "dead_jobs": "SELECT * FROM jobs WHERE state = 'dead' ORDER BY id",
    # deliveries
    "record_delivery": "INSERT INTO deliveries (envelope_id, destination, delivered_at,"
    " status) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
    "delivered": "SELECT envelope_id FROM deliveries WHERE destination = %s"
    " AND envelope_id = ANY(%s::text[])",
    # reading
    "envelope": "SELECT * FROM envelopes WHERE id = %s",
    "find": "SELECT id FROM envelopes WHERE dedup_key = %s",
    "envelopes": "SELECT * FROM envelopes ORDER BY received_at",
    "envelopes_of_kind": "SELECT * FROM envelopes WHERE kind = %s ORDER BY received_at",
    "count_received": "SELECT kind, COUNT(*) AS n FROM envelopes GROUP BY kind",
    "count_studies": "SELECT state, COUNT(*) AS n FROM studies GROUP BY state",
    "count_jobs": "SELECT stage, state, COUNT(*) AS n FROM jobs GROUP BY stage, state",
    "oldest_ready": "SELECT MIN(created_at) AS t FROM jobs WHERE state IN ('ready', 'leased')",
    "oldest_by_lane": "SELECT lane, MIN(created_at) AS t FROM jobs"
    " WHERE state IN ('ready', 'leased') GROUP BY lane",
    # retention
    "busy_subjects": "SELECT subject FROM jobs WHERE state != 'done'",
    "purgeable_studies": "SELECT study_key FROM studies WHERE state = 'complete'"
    " AND last_at < %s ORDER BY last_at",
    "purgeable_messages": "SELECT id FROM envelopes WHERE kind = 'hl7' AND received_at < %s"
    " ORDER BY received_at",
    "done_jobs": "SELECT id, subject, payload FROM jobs WHERE state = 'done'",
    "study_still_done": "SELECT state, last_at FROM studies WHERE study_key = %s FOR UPDATE",
    "target_envelopes": "SELECT id, attrs, spool_key FROM envelopes"
    " WHERE study_key = %s OR id = %s ORDER BY received_at",
    "delete_deliveries": "DELETE FROM deliveries WHERE envelope_id = ANY(%s::text[])",
    "delete_envelopes": "DELETE FROM envelopes WHERE id = ANY(%s::text[])",
    "delete_jobs": "DELETE FROM jobs WHERE id = ANY(%s::bigint[])",
    "delete_study_refs": "DELETE FROM study_refs WHERE study_key = %s",
    "delete_study": "DELETE FROM studies WHERE study_key = %s",
    "envelope_spool_keys": "SELECT spool_key FROM envelopes WHERE spool_key IS NOT NULL",
    "job_payloads": "SELECT payload FROM jobs",
    "sealed_prefixes": "SELECT substr(attrs, 1, 64) AS a, substr(inline_blob, 1, 64) AS b,"
    " substr(ack, 1, 64) AS c FROM envelopes",
}

# Errors that mean "another transaction got there first; run it again": a deadlock, a
# serialization failure, or a job made ready beside one that became ready meanwhile.
_RETRIES = 5


# --- where the database is, for messages --------------------------------------------------


def describe(dsn: str) -> str:
    """``host:port/dbname`` of *dsn*, never its password (for messages and logs)."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "PostgreSQL (an unreadable connection string)"
    host = str(info.get("host") or info.get("hostaddr") or "localhost")
    port = str(info.get("port") or "5432")
    dbname = str(info.get("dbname") or info.get("user") or "")
    return f"{host}:{port}/{dbname}" if dbname else f"{host}:{port}"


def _detail(exc: BaseException, dsn: str) -> str:
    """The first line of a driver error, with the password (if the DSN has one) blanked."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    with contextlib.suppress(psycopg.Error):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            text = text.replace(str(password), "***")
    if isinstance(exc, psycopg.ProgrammingError) and "connection info" in text:
        return "the connection string cannot be read"  # libpq may quote any part of it
    return text


def _connect(dsn: str, *, autocommit: bool, timeout: float) -> psycopg.Connection[DictRow]:
    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, row_factory=dict_row, connect_timeout=max(1, int(timeout))
        )
    except psycopg.Error as exc:
        raise QueueUnavailable(
            f"queue database {describe(dsn)} cannot be reached: {_detail(exc, dsn)}"
        ) from exc


# --- migrations ---------------------------------------------------------------------------


def _version(cur: Cursor) -> int | None:
    row = cur.execute(SQL["schema_table"]).fetchone()
    if row is None or not row["present"]:
        return None
    row = cur.execute(SQL["schema_version"]).fetchone()
    return None if row is None else int(row["value"])


def schema_version(dsn: str, *, timeout: float = CONNECT_TIMEOUT) -> int | None:
    """The schema version of the database at *dsn*; None when it has no queue schema yet."""
    with _connect(dsn, autocommit=True, timeout=timeout) as conn, conn.cursor() as cur:
        try:
            return _version(cur)
        except psycopg.Error as exc:
            raise QueueUnavailable(
                f"queue database {describe(dsn)} cannot be read: {_detail(exc, dsn)}"
            ) from exc


def _too_new(dsn: str, version: int) -> QueueUnavailable:
    return QueueUnavailable(
        f"queue database {describe(dsn)} has schema {version}, newer than this "
        f"gateway's {SCHEMA_VERSION}: run the newer gateway version"
    )


def migrate(dsn: str, *, timeout: float = CONNECT_TIMEOUT) -> list[int]:
    """Bring the database at *dsn* to :data:`SCHEMA_VERSION`; the versions applied.

    What is missing is applied in one transaction holding a transaction-scoped advisory
    lock, the version read again once the lock is held: of several nodes starting at
    once, one migrates and the others find it done.  A schema newer than this gateway's
    raises :class:`QueueUnavailable` naming both versions, and changes nothing.
    """
    with _connect(dsn, autocommit=True, timeout=timeout) as conn, conn.cursor() as cur:
        try:
            current = _version(cur)
            if current is not None and current > SCHEMA_VERSION:
                raise _too_new(dsn, current)
            if current == SCHEMA_VERSION:
                return []
            with conn.transaction():
                cur.execute(SQL["schema_lock"], (MIGRATION_LOCK,))
                current = _version(cur) or 0
                if current > SCHEMA_VERSION:
                    raise _too_new(dsn, current)
                applied = [m for m in MIGRATIONS if m.version > current]
                for migration in applied:
                    for statement in migration.statements:
                        cur.execute(statement)
                if applied:
                    cur.execute(SQL["schema_set"], (str(SCHEMA_VERSION),))
            return [m.version for m in applied]
        except psycopg.Error as exc:
            raise QueueUnavailable(
                f"queue database {describe(dsn)} cannot be migrated: {_detail(exc, dsn)}"
            ) from exc


# --- the engine ---------------------------------------------------------------------------


class PostgresQueue:
    """The :class:`~gateway.store.queue.Queue` on a PostgreSQL database (see the module
    docstring).  Thread-safe: each call takes a connection from a pool for one
    transaction."""

    def __init__(
        self,
        dsn: str,
        *,
        durable: bool = True,
        pool_size: int = 4,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        """Open (and migrate, when older) the queue at *dsn*.

        *durable*: every commit waits for the WAL flush (what the ingest edges need).
        ``durable=False`` is for workers' bookkeeping: their commits do not wait (the
        ingest methods still do).  *timeout*: seconds to wait for a connection before
        :class:`QueueUnavailable` (at open, and for each call when the pool is busy)."""
        self.dsn = dsn
        self.where = describe(dsn)
        self._durable = durable
        self._timeout = timeout
        migrate(dsn, timeout=timeout)
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            dsn,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": max(1, int(timeout)),
            },
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            configure=None if durable else _bookkeeping,
            check=_check_idle,
            timeout=timeout,
            name=f"queue {self.where}",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except psycopg.Error as exc:
            self._pool.close()
            raise QueueUnavailable(
                f"queue database {self.where} cannot be reached: {_detail(exc, dsn)}"
            ) from exc
        self._listener: psycopg.Connection[DictRow] | None = None
        self._listen_lock = threading.Lock()

    # --- transactions ------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, doing: str) -> QueueUnavailable:
        return QueueUnavailable(
            f"queue database {self.where} cannot be {doing}: {_detail(exc, self.dsn)}"
        )

    def _write(
        self, body: Callable[[Cursor], T], *, ingest: bool = False, single: bool = False
    ) -> T:
        """Run *body* in one transaction, committed on return; run again (up to a few
        times) when it collided with a concurrent one (deadlock, serialization failure,
        a second ready job for one subject).  *ingest*: this commit waits for the WAL
        flush even on a ``durable=False`` queue.  *single*: *body* runs one statement,
        which is a transaction of its own (autocommit: no BEGIN and COMMIT round trips)."""
        for attempt in range(1, _RETRIES + 1):
            try:
                with self._pool.connection() as conn, conn.cursor() as cur:
                    if single and (self._durable or not ingest):
                        return body(cur)
                    with conn.transaction():
                        if ingest and not self._durable:
                            cur.execute(SQL["durable_commit"])
                        return body(cur)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == _RETRIES:
                    raise self._unavailable(exc, "written") from exc
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != "jobs_one_ready" or attempt == _RETRIES:
                    raise
            except (
                psycopg.OperationalError,
                psycopg.InterfaceError,
                psycopg.errors.ReadOnlySqlTransaction,
            ) as exc:
                raise self._unavailable(exc, "written") from exc
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Cursor]:
        """A cursor for reads (autocommit: each statement sees what is committed)."""
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(exc, "read") from exc

    # --- ingest ------------------------------------------------------------------------

    def record_instance(
        self, env: Envelope, sealed_attrs: bytes, quiet: float, inline: bytes | None = None
    ) -> Ack:
        """Record a received DICOM instance and (re)start its study's quiet-period timer,
        committed durably before it returns."""
        assert env.study_key is not None
        params = {
            "id": env.id,
            "source": env.source,
            "received": env.received_at,
            "dedup": env.dedup_key,
            "spool": env.spool_key,
            "inline": inline,
            "study": env.study_key,
            "size": env.size,
            "attrs": sealed_attrs,
            "quiet": quiet,
        }

        def body(cur: Cursor) -> Ack:
            # one statement, one transaction, one round trip (migration 2)
            row = cur.execute(SQL["record_instance"], params).fetchone()
            assert row is not None
            return Ack(new=bool(row["new"]), envelope_id=row["envelope_id"])

        return self._write(body, ingest=True, single=True)

    def touch_study(self, study_key: str, now: float, quiet: float) -> None:
        """An instance of the study was received again: its quiet-period timer restarts,
        and a complete study is reopened as a new generation."""
        self._write(
            lambda cur: cur.execute(
                SQL["touch_study"], {"now": now, "due": now + quiet, "study": study_key}
            ),
            ingest=True,
            single=True,
        )

    def record_message(
        self, env: Envelope, sealed_message: bytes, sealed_attrs: bytes, ack: bytes
    ) -> Ack:
        """Record an HL7 message (sealed in its row: one durable commit) with its ACK and
        its route job.  A resent message gets the stored ACK and stores nothing."""
        assert env.kind is Kind.HL7 and env.spool_key is None and env.study_key is None
        params = {
            "id": env.id,
            "source": env.source,
            "received": env.received_at,
            "dedup": env.dedup_key,
            "inline": sealed_message,
            "size": env.size,
            "attrs": sealed_attrs,
            "ack": ack,
            "payload": payload_json(RoutePayload(Kind.HL7)),
        }

        def body(cur: Cursor) -> Ack:
            # one statement, one transaction, one round trip (migration 4)
            row = cur.execute(SQL["record_message"], params).fetchone()
            assert row is not None
            return Ack(new=bool(row["new"]), envelope_id=row["envelope_id"], ack=row["ack"])

        return self._write(body, ingest=True, single=True)

    def find(self, dedup_key: str) -> str | None:
        with self._read() as cur:
            row = cur.execute(SQL["find"], (dedup_key,)).fetchone()
        return None if row is None else str(row["id"])

    # --- study assembly ----------------------------------------------------------------

    def complete_due_studies(self, now: float) -> list[str]:
        """Mark studies whose quiet period has passed complete and queue each for routing,
        in one transaction.  A study another transaction holds (an instance arriving
        right now) is left for the next call.  Open studies written after *now* (the clock
        stepped back) first have their quiet periods moved back by the step."""

        def body(cur: Cursor) -> list[str]:
            cur.execute(SQL["rebase_studies"], {"now": now, "slack": CLOCK_SLACK})
            rows = cur.execute(SQL["due_studies"], (now,)).fetchall()
            for row in rows:
                cur.execute(SQL["complete_study"], (now, row["study_key"]))
                _enqueue(
                    cur,
                    Stage.ROUTE,
                    row["study_key"],
                    now,
                    RoutePayload(Kind.DICOM, row["generation"], bool(row["reopened"])),
                    now,
                )
            return [str(r["study_key"]) for r in rows]

        return self._write(body)

    def study(self, study_key: str) -> StudyInfo | None:
        with self._read() as cur:
            row = cur.execute(SQL["study"], (study_key,)).fetchone()
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
        with self._read() as cur:
            row = cur.execute(SQL["next_study_due"]).fetchone()
        return None if row is None or row["due"] is None else float(row["due"])

    def record_study_refs(self, study_key: str, refs: list[str]) -> None:
        """Remember other identifiers of a study (the latest study with a ref wins)."""
        if not refs:
            return
        self._write(
            lambda cur: cur.executemany(SQL["record_study_ref"], [(ref, study_key) for ref in refs])
        )

    def study_for_ref(self, ref: str) -> str | None:
        with self._read() as cur:
            row = cur.execute(SQL["study_for_ref"], (ref,)).fetchone()
        return None if row is None else str(row["study_key"])

    def study_envelopes(self, study_key: str) -> list[Envelope]:
        with self._read() as cur:
            rows = cur.execute(SQL["study_envelopes"], (study_key,)).fetchall()
        return [Envelope.from_row(r) for r in rows]

    # --- jobs --------------------------------------------------------------------------

    def enqueue(
        self,
        stage: Stage,
        subject: str,
        run_at: float,
        payload: Payload,
        *,
        lane: str = "",
    ) -> int:
        """Queue a job; a job of the same (stage, subject) already waiting is updated
        instead (its payload replaced, the earlier run time kept).  Announced at commit."""
        return self._write(
            lambda cur: _enqueue(cur, stage, subject, run_at, payload, run_at, lane), single=True
        )

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
        """Take the next due job of *stages* (in *lane*, when given) in one statement,
        skipping rows other transactions hold.  *alone*: in one transaction that first
        takes the lane's advisory lock, so two nodes cannot both find the lane free.  A job
        whose payload no worker can read becomes a dead letter saying why (a second
        statement, guarded by the token just taken), and the lease moves on to the next."""
        params: dict[str, Any] = {
            "token": secrets.token_hex(8),
            "expires": now + seconds,
            "worker": worker,
            "now": now,
            "stages": [s.value for s in stages],
            "lane": lane,
        }
        sql = SQL["lease"] if lane is None else SQL["lease_in_lane"]
        alone = alone and lane is not None
        if alone:
            sql = SQL["lease_in_lane_alone"]

        def body(cur: Cursor) -> Job | None:
            if alone:
                cur.execute(SQL["lock_lane"], params)
            while True:
                row = cur.execute(sql, params).fetchone()
                if row is None:
                    return None
                job = Job.from_row(row)
                try:
                    job.payload  # noqa: B018 (read now: a job no worker can read is dead)
                    return job
                except PayloadError as exc:
                    cur.execute(
                        SQL["dead_letter_unreadable"],
                        (f"unreadable job payload: {exc}"[:2000], job.id, job.lease_token),
                    )

        return self._write(body, single=not alone)

    def _check_lease(self, cur: Cursor, job: Job) -> None:
        """Lock the job's row if it is still leased with *job*'s token; else LeaseLost."""
        if cur.execute(SQL["check_lease"], (job.id, job.lease_token)).fetchone() is None:
            raise _lease_lost(job)

    def heartbeat(self, job: Job, seconds: float, now: float) -> Job:
        def body(cur: Cursor) -> Job:
            row = cur.execute(
                SQL["heartbeat"], (now + seconds, now, job.id, job.lease_token)
            ).fetchone()
            if row is None:
                raise _lease_lost(job)
            return Job.from_row(row)

        return self._write(body, single=True)

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
        a crash leaves either both or neither.  The guarded update comes first, so the
        job's row is held until the commit.  With them, a model *run* is written to the
        findings store, or a run's result marked *delivered* ((model, subject))."""

        def body(cur: Cursor) -> None:
            if cur.execute(SQL["complete"], (now, job.id, job.lease_token)).fetchone() is None:
                raise _lease_lost(job)
            for nxt in then:
                _enqueue(cur, nxt.stage, nxt.subject, nxt.run_at or now, nxt.payload, now, nxt.lane)
            if run is not None:
                findings.insert_run(lambda sql, params: cur.execute(_pg(sql), params), run)
            if delivered is not None:
                model, subject = delivered
                cur.execute(
                    _pg(findings.MARK_DELIVERED), {"now": now, "model": model, "subject": subject}
                )

        self._write(body, single=not then and run is None and delivered is None)

    # --- the findings store ---------------------------------------------------------------

    def findings_runs(self, flt: RunFilter) -> list[ModelRun]:
        sql, params = findings.select_runs(flt)
        with self._read() as cur:
            rows = cur.execute(_pg(sql), params).fetchall()
        return list(findings.runs_from_rows(rows))

    def findings_mark(self, since: float) -> tuple[int, float | None, float | None]:
        with self._read() as cur:
            row = cur.execute(_pg(findings.MARK), {"since": since}).fetchone()
        assert row is not None  # an aggregate answers one row
        return int(row["n"]), row["oldest"], row["newest"]

    def purge_findings(self, cutoff: float, *, dry_run: bool = False) -> int:
        if dry_run:
            with self._read() as cur:
                row = cur.execute(_pg(findings.COUNT_PURGE), {"cutoff": cutoff}).fetchone()
            return int(row["n"]) if row is not None else 0

        def body(cur: Cursor) -> int:
            return cur.execute(_pg(findings.PURGE_RUNS), {"cutoff": cutoff}).rowcount

        return self._write(body, single=True)  # the findings go with their run (CASCADE)

    def fail(self, job: Job, error: str, retry_at: float, now: float) -> None:
        """Back to 'ready' at *retry_at* with *error* kept (or superseded, see
        :func:`_make_ready`)."""

        def body(cur: Cursor) -> None:
            self._check_lease(cur, job)
            _make_ready(
                cur,
                "ready_after_fail",
                [job.id],
                {"run_at": retry_at, "error": error[:2000]},
                now,
            )

        self._write(body)

    def dead(self, job: Job, error: str, now: float) -> None:
        def body(cur: Cursor) -> None:
            row = cur.execute(SQL["dead"], (error[:2000], now, job.id, job.lease_token)).fetchone()
            if row is None:
                raise _lease_lost(job)

        self._write(body, single=True)

    def replay(self, job_ids: list[int] | None, now: float) -> int:
        """Put dead jobs back to ready (all of them when *job_ids* is None); return how
        many went back.  A dead job whose subject already has a waiting job is superseded."""

        def body(cur: Cursor) -> int:
            if job_ids is None:
                rows = cur.execute(SQL["dead_ids_for_update"]).fetchall()
            else:
                ids = storable_job_ids(job_ids)
                rows = cur.execute(SQL["listed_dead_ids_for_update"], (ids,)).fetchall()
            moved, _ = _make_ready(cur, "ready_after_replay", [r["id"] for r in rows], {}, now)
            return moved

        return self._write(body)

    def sweep_expired(self, now: float) -> int:
        """Return jobs whose lease expired (a crashed or stuck worker) to the ready state,
        to run now.  First, waiting and leased jobs written after *now* (the clock stepped
        back) are moved back by the step."""

        def body(cur: Cursor) -> int:
            cur.execute(SQL["rebase_jobs"], {"now": now, "slack": CLOCK_SLACK})
            rows = cur.execute(SQL["expired_ids_for_update"], (now,)).fetchall()
            moved, superseded = _make_ready(
                cur, "ready_after_expiry", [r["id"] for r in rows], {}, now
            )
            return moved + superseded

        return self._write(body)

    def release_dead_workers(self, alive: Callable[[str], bool], now: float) -> int:
        """Return jobs leased by workers that no longer exist (*alive* says, by worker
        name) to the ready state at once, instead of waiting for their leases to expire."""

        def body(cur: Cursor) -> int:
            rows = cur.execute(SQL["leased_for_update"]).fetchall()
            dead = [r["id"] for r in rows if not alive(str(r["worker"] or ""))]
            moved, superseded = _make_ready(cur, "ready_after_worker_died", dead, {}, now)
            return moved + superseded

        return self._write(body)

    # --- waking idle workers -----------------------------------------------------------

    def listen(self) -> None:
        """Start listening for jobs that become ready (a dedicated connection).  Call it
        before the first :meth:`lease` that may find nothing, so that a job enqueued
        between that lease and :meth:`wait_for_jobs` still wakes the worker;
        :meth:`wait_for_jobs` starts listening itself if this was not called."""
        with self._listen_lock:
            if self._listener is not None:
                return
            conn = _connect(self.dsn, autocommit=True, timeout=self._timeout)
            try:
                conn.execute(SQL["listen"])
            except psycopg.Error as exc:
                conn.close()
                raise self._unavailable(exc, "listened to") from exc
            self._listener = conn

    def wait_for_jobs(self, timeout: float) -> bool:
        """Block until a job becomes ready somewhere (any stage, any node: a notification
        on ``gateway_jobs``) or *timeout* seconds pass; True when woken.  Notifications
        that arrived since the previous call count, and a burst of them wakes once.  A
        job that becomes *due* later (a retry time) sends no notification at that time:
        pass a *timeout* no longer than the wait for the next due job.  One thread waits
        per queue at a time (others queue up behind it).  A lost connection raises
        :class:`QueueUnavailable`; the next call listens again."""
        self.listen()
        listener = self._listener
        assert listener is not None
        try:
            woken = any(True for _ in listener.notifies(timeout=max(0.0, timeout), stop_after=1))
            if woken:  # the rest of a burst
                for _ in listener.notifies(timeout=0.0):
                    pass
            return woken
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            with self._listen_lock:
                if self._listener is listener:
                    self._listener = None
            with contextlib.suppress(psycopg.Error):
                listener.close()
            raise self._unavailable(exc, "listened to") from exc

    # --- deliveries ---------------------------------------------------------------------

    def record_delivery(self, envelope_id: str, destination: str, status: int, now: float) -> None:
        self.record_deliveries(destination, [(envelope_id, status)], now)

    def record_deliveries(
        self, destination: str, delivered: Sequence[tuple[str, int]], now: float
    ) -> None:
        """Record (envelope id, status) pairs that reached *destination*, in one commit."""
        if not delivered:
            return
        self._write(
            lambda cur: cur.executemany(
                SQL["record_delivery"],
                [(envelope_id, destination, now, status) for envelope_id, status in delivered],
            )
        )

    def delivered(self, destination: str, envelope_ids: Sequence[str]) -> set[str]:
        """Which of *envelope_ids* reached *destination* already."""
        if not envelope_ids:
            return set()
        with self._read() as cur:
            rows = cur.execute(SQL["delivered"], (destination, list(envelope_ids))).fetchall()
        return {str(r["envelope_id"]) for r in rows}

    # --- reading -----------------------------------------------------------------------

    def envelope(self, envelope_id: str) -> tuple[Envelope, bytes, bytes | None]:
        """An envelope with its sealed attributes and (HL7) sealed inline message."""
        with self._read() as cur:
            row = cur.execute(SQL["envelope"], (envelope_id,)).fetchone()
        if row is None:
            raise KeyError(envelope_id)
        inline = row["inline_blob"]
        return (
            Envelope.from_row(row),
            bytes(row["attrs"]),
            None if inline is None else bytes(inline),
        )

    def envelopes(self, kind: Kind | None = None) -> list[Envelope]:
        with self._read() as cur:
            if kind is None:
                rows = cur.execute(SQL["envelopes"]).fetchall()
            else:
                rows = cur.execute(SQL["envelopes_of_kind"], (kind.value,)).fetchall()
        return [Envelope.from_row(r) for r in rows]

    def job(self, job_id: int) -> Job | None:
        if not storable_job_ids([job_id]):
            return None
        with self._read() as cur:
            row = cur.execute(SQL["job"], (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def dead_jobs(self) -> list[Job]:
        with self._read() as cur:
            rows = cur.execute(SQL["dead_jobs"]).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts for ``gateway queue status``: received objects, studies, jobs by stage/state."""
        out: dict[str, dict[str, int]] = {"received": {}, "studies": {}}
        with self._read() as cur:
            for r in cur.execute(SQL["count_received"]).fetchall():
                out["received"][r["kind"]] = int(r["n"])
            for r in cur.execute(SQL["count_studies"]).fetchall():
                out["studies"][r["state"]] = int(r["n"])
            for r in cur.execute(SQL["count_jobs"]).fetchall():
                out.setdefault(f"jobs:{r['stage']}", {})[r["state"]] = int(r["n"])
        return out

    def oldest_ready_age(self, now: float) -> float | None:
        with self._read() as cur:
            row = cur.execute(SQL["oldest_ready"]).fetchone()
        return None if row is None or row["t"] is None else now - float(row["t"])

    def oldest_waiting_by_lane(self, now: float) -> dict[str, float]:
        """Age of the oldest job not yet done, per lane ('' = routing and inference)."""
        with self._read() as cur:
            rows = cur.execute(SQL["oldest_by_lane"]).fetchall()
        return {str(r["lane"]): now - float(r["t"]) for r in rows}

    def job_groups(self) -> list[JobGroup]:
        with self._read() as cur:
            rows = cur.execute(_pg(JOB_GROUPS)).fetchall()
        return [
            JobGroup(
                str(r["stage"]),
                str(r["lane"]),
                str(r["state"]),
                int(r["jobs"]),
                int(r["retried"]),
                float(r["oldest_created"]),
                float(r["newest_updated"]),
            )
            for r in rows
        ]

    def study_timelines(self, limit: int) -> list[StudyTimeline]:
        with self._read() as cur:
            studies = [
                (
                    str(r["study_key"]),
                    str(r["state"]),
                    int(r["instances"]),
                    int(r["generation"]),
                    float(r["first_at"]),
                    None if r["completed_at"] is None else float(r["completed_at"]),
                )
                for r in cur.execute(_pg(RECENT_STUDIES), {"limit": limit}).fetchall()
            ]
            since = min((s[4] for s in studies), default=None)
            jobs = (
                []
                if since is None
                else [
                    (str(r["stage"]), str(r["subject"]), str(r["state"]), float(r["updated_at"]))
                    for r in cur.execute(_pg(JOBS_SINCE), {"since": since}).fetchall()
                ]
            )
        return study_timelines(studies, jobs)

    # --- retention ----------------------------------------------------------------------

    def purge_rows(self, cutoff: float, *, dry_run: bool = False, chunk: int = 200) -> PurgedRows:
        """Delete what the gateway is done with and received before *cutoff*: complete
        studies and HL7 messages whose every job is done, with their envelopes, jobs,
        delivery records and accession references.  A study or message with a job that is
        waiting, running or dead is kept (a dead letter may still be replayed).

        Spool files are not touched here: their keys come back in ``spool_keys``, for the
        caller to remove once the rows are gone.  Deletes run in transactions of *chunk*
        subjects; a study sent again since the snapshot is kept.
        """
        with self._read() as cur:
            plan = plan_purge(
                (str(r["subject"]) for r in cur.execute(SQL["busy_subjects"]).fetchall()),
                [
                    str(r["study_key"])
                    for r in cur.execute(SQL["purgeable_studies"], (cutoff,)).fetchall()
                ],
                [
                    str(r["id"])
                    for r in cur.execute(SQL["purgeable_messages"], (cutoff,)).fetchall()
                ],
                (
                    (int(r["id"]), str(r["subject"]), str(r["payload"]))
                    for r in cur.execute(SQL["done_jobs"]).fetchall()
                ),
            )
        if dry_run:
            return plan.dry_run(self._first_attrs, self.study_envelopes)
        out, jobs, keys = plan.rows, plan.jobs, plan.keys
        ordered = [*out.studies, *out.messages]
        study_keys = set(out.studies)
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            result = self._write(
                functools.partial(
                    _purge_chunk,
                    part=part,
                    study_keys=study_keys,
                    jobs=jobs,
                    keys=keys,
                    cutoff=cutoff,
                )
            )
            for target in result.kept_studies:
                out.studies.remove(target)
                out.kept += 1
            out.spool_keys += result.spool_keys
            out.study_attrs += result.study_attrs
            out.envelopes += result.envelopes
        return out

    def _first_attrs(self, study_key: str) -> tuple[str, bytes]:
        with self._read() as cur:
            row = cur.execute(SQL["first_attrs"], (study_key,)).fetchone()
        return ("", b"") if row is None else (str(row["id"]), bytes(row["attrs"]))

    def referenced_spool_keys(self) -> set[str]:
        """Every spool key a row still names: envelopes' objects, and the results, masks,
        crosswalks and built objects that jobs carry in their payloads."""
        with self._read() as cur:
            keys = {str(r["spool_key"]) for r in cur.execute(SQL["envelope_spool_keys"])}
            for r in cur.execute(SQL["job_payloads"]):
                keys.update(SPOOL_KEY.findall(str(r["payload"])))
        return keys

    def sealed_blobs(self) -> Iterator[bytes]:
        """The sealed values kept in rows (attributes, inline HL7 messages, their ACKs): for
        finding which data keys are still in use."""
        with self._read() as cur:
            rows = cur.execute(SQL["sealed_prefixes"]).fetchall()
        for r in rows:
            for value in (r["a"], r["b"], r["c"]):
                if value is not None:
                    yield bytes(value)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A session-level advisory lock on a connection of its own, tried without
        waiting: one holder on every node sharing the database; a node that dies releases
        it with its connection."""
        conn = _connect(self.dsn, autocommit=True, timeout=self._timeout)
        try:
            row = conn.execute(SQL["try_lock"], (name,)).fetchone()
            held = bool(row and row["held"])
            yield held
            if held:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(SQL["unlock"], (name,))
        except psycopg.Error as exc:
            raise self._unavailable(exc, "locked") from exc
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        with self._listen_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(psycopg.Error):
                listener.close()
        self._pool.close()


# --- statements shared by the transactions above ------------------------------------------


def _bookkeeping(conn: psycopg.Connection[DictRow]) -> None:
    """Configure a pooled connection of a ``durable=False`` queue: commits do not wait
    for the WAL flush (the ingest methods turn it back on for their transaction)."""
    conn.execute(SQL["bookkeeping_commit"])


def _check_idle(conn: psycopg.Connection[DictRow]) -> None:
    """Before the pool lends a connection: an idle connection has nothing to read unless
    the server closed it (a restart, a terminated backend) or reports something; only
    then is it checked with a round trip (and, if broken, replaced).  A healthy idle
    connection costs no round trip."""
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        ConnectionPool.check_connection(conn)


def _lease_lost(job: Job) -> LeaseLost:
    return LeaseLost(f"job {job.id} ({job.stage}) is no longer leased by this worker")


def _enqueue(
    cur: Cursor,
    stage: Stage,
    subject: str,
    run_at: float,
    payload: Payload,
    now: float,
    lane: str = "",
) -> int:
    row = cur.execute(
        SQL["enqueue"],
        {
            "stage": stage.value,
            "subject": subject,
            "run_at": run_at,
            "payload": payload_json(payload),
            "now": now,
            "lane": lane,
        },
    ).fetchone()
    assert row is not None
    return int(row["id"])


def _make_ready(
    cur: Cursor, statement: str, ids: list[int], params: dict[str, Any], now: float
) -> tuple[int, int]:
    """Move jobs *ids* (rows this transaction holds locked) back to 'ready' with the
    *statement*'s changes.  Only one job per (stage, subject) may wait
    (``jobs_one_ready``): the newest of them goes back unless a job for that subject is
    waiting already, and the others are closed as superseded (the waiting job does the
    same work, on newer data).  Returns (moved, superseded)."""
    if not ids:
        return 0, 0
    cur.execute(SQL[statement], {**params, "ids": ids, "now": now})
    moved = cur.rowcount
    cur.execute(SQL["supersede"], {"error": SUPERSEDED, "now": now, "ids": ids})
    return moved, cur.rowcount


@dataclass
class _Purged:
    kept_studies: list[str]
    spool_keys: list[str]
    study_attrs: list[tuple[str, bytes]]
    envelopes: int


def _purge_chunk(
    cur: Cursor,
    part: list[str],
    study_keys: set[str],
    jobs: dict[str, list[int]],
    keys: dict[str, list[str]],
    cutoff: float,
) -> _Purged:
    """Delete the rows of *part*'s subjects (one transaction); a study that is no longer
    complete and old (sent again since the snapshot) is kept."""
    out = _Purged([], [], [], 0)
    for target in part:
        if target in study_keys:
            row = cur.execute(SQL["study_still_done"], (target,)).fetchone()
            if row is None or row["state"] != "complete" or float(row["last_at"]) >= cutoff:
                out.kept_studies.append(target)
                continue
        rows = cur.execute(SQL["target_envelopes"], (target, target)).fetchall()
        envs = [(str(r["id"]), bytes(r["attrs"])) for r in rows]
        out.spool_keys += [str(r["spool_key"]) for r in rows if r["spool_key"]]
        out.spool_keys += keys.get(target, [])
        if target in study_keys and envs:
            out.study_attrs.append(envs[0])
        ids = [e[0] for e in envs]
        cur.execute(SQL["delete_deliveries"], (ids,))
        cur.execute(SQL["delete_envelopes"], (ids,))
        cur.execute(SQL["delete_jobs"], (jobs.get(target, []),))
        cur.execute(SQL["delete_study_refs"], (target,))
        cur.execute(SQL["delete_study"], (target,))
        out.envelopes += len(ids)
    return out
