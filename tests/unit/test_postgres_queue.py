"""What only the PostgreSQL engine has: versioned migrations under an advisory lock, leases
that skip rows other connections hold, LISTEN/NOTIFY wake-ups, retries of colliding
transactions, and connection failures reported as QueueUnavailable.  The behaviour every
engine shares is the contract suite, ``test_queue.py``; these run on the session's
throwaway server (``tests/pg.py``)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from gateway.config import read_config
from gateway.envelope import InferPayload, JobState, Kind, NextJob, RoutePayload, Stage
from gateway.errors import ConfigError, QueueUnavailable
from gateway.store import postgres
from gateway.store.backend import _dsn, database_label, database_password, open_queue
from gateway.store.postgres import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SQL,
    PostgresQueue,
    migrate,
    schema_version,
)
from gateway.store.sqlite import SQLiteQueue
from tests import pg
from tests.queues import any_payload
from tests.unit.test_queue import QUIET, instance

DsnFactory = Callable[[], str]


@pytest.fixture
def dsn(pg_dsn: DsnFactory) -> str:
    return pg_dsn()


@pytest.fixture
def queue(dsn: str) -> Iterator[PostgresQueue]:
    q = PostgresQueue(dsn)
    yield q
    q.close()


def _sql(dsn: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement.encode())
        return cur.fetchall() if cur.description else []


# --- migrations ---------------------------------------------------------------------------


def test_an_empty_database_is_migrated_to_the_current_schema(dsn: str) -> None:
    assert schema_version(dsn) is None
    assert migrate(dsn) == [m.version for m in MIGRATIONS]
    assert schema_version(dsn) == SCHEMA_VERSION
    assert migrate(dsn) == []  # nothing left to do
    tables = {
        r[0]
        for r in _sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert tables == {
        *("meta", "envelopes", "studies", "jobs", "study_refs", "deliveries"),
        *("ai_runs", "ai_findings"),  # the findings store
    }


def test_opening_a_queue_migrates_an_empty_database(dsn: str) -> None:
    q = PostgresQueue(dsn)
    try:
        assert schema_version(dsn) == SCHEMA_VERSION
        q.enqueue(Stage.ROUTE, "s", 1.0, RoutePayload(Kind.DICOM))
        assert q.counts()["jobs:route"] == {"ready": 1}
    finally:
        q.close()


def test_a_version_1_database_gets_the_one_round_trip_ingest_and_keeps_its_rows(
    dsn: str,
) -> None:
    """A database made by the first release (schema 1) is brought to the current one in
    place: its rows stay, and an instance of a study it holds is recorded by migration 2's
    function (the study's quiet period restarts, a complete study is reopened)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in MIGRATIONS[0].statements:
            conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
        conn.execute(
            "INSERT INTO studies (study_key, state, first_at, last_at, complete_due,"
            " instances) VALUES ('study-1', 'complete', 1, 1, 6, 1)"
        )
    q = PostgresQueue(dsn)
    try:
        assert schema_version(dsn) == SCHEMA_VERSION
        late = instance("9.9", at=100.0)
        assert q.record_instance(late, b"a", QUIET).new
        study = q.study("study-1")
        assert study is not None
        assert (study.state, study.instances, study.complete_due) == ("open", 2, 100.0 + QUIET)
        assert study.generation == 2
        assert _sql(dsn, f"SELECT late FROM envelopes WHERE id = '{late.id}'") == [(1,)]
    finally:
        q.close()


def test_a_newer_schema_is_refused_naming_both_versions(dsn: str) -> None:
    migrate(dsn)
    _sql(dsn, "UPDATE meta SET value = '99' WHERE key = 'schema'")
    expected = rf"schema 99, newer than this gateway's {SCHEMA_VERSION}"
    with pytest.raises(QueueUnavailable, match=expected):
        PostgresQueue(dsn)
    with pytest.raises(QueueUnavailable, match=expected):
        migrate(dsn)
    assert schema_version(dsn) == 99  # untouched


def test_two_nodes_migrating_at_once_apply_the_schema_once(dsn: str) -> None:
    """The advisory lock serialises them; the second reads the version again once it holds
    the lock and finds nothing to do."""
    barrier = threading.Barrier(4)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def node() -> None:
        barrier.wait()
        try:
            results.append(migrate(dsn))
        except BaseException as exc:  # a lost race would be a duplicate-table error
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [[], [], [], [m.version for m in MIGRATIONS]]
    assert schema_version(dsn) == SCHEMA_VERSION


def _check_set(table: str, column: str) -> set[str]:
    (create,) = [
        s for m in MIGRATIONS for s in m.statements if s.startswith(f"CREATE TABLE {table} (")
    ]
    check = re.search(rf"\b{column}\b[^\n]*CHECK \({column} IN \(([^)]*)\)\)", create)
    assert check is not None
    return set(re.findall(r"'([^']*)'", check.group(1)))


def test_the_schema_check_constraints_match_the_enums() -> None:
    assert _check_set("jobs", "state") == {s.value for s in JobState}
    assert _check_set("envelopes", "kind") == {k.value for k in Kind}


def test_the_schema_check_constraint_rejects_an_unknown_job_state(
    queue: PostgresQueue, dsn: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        _sql(
            dsn,
            "INSERT INTO jobs (stage, subject, state, run_at, created_at, updated_at)"
            " VALUES ('route', 's', 'paused', 0, 0, 0)",
        )


def test_every_named_statement_is_used_and_every_use_is_named() -> None:
    """All SQL sits in SQL and MIGRATIONS; the code refers to it by name."""
    source = Path(postgres.__file__).read_text()
    used = set(re.findall(r'SQL\["(\w+)"\]', source)) | set(
        re.findall(r'"(ready_after_\w+)"', source)
    )
    assert used == set(SQL)


# --- leases -------------------------------------------------------------------------------


def test_a_row_another_connection_holds_is_skipped_not_waited_for(
    queue: PostgresQueue, dsn: str
) -> None:
    first = queue.enqueue(Stage.INFER, "a", 1.0, any_payload(Stage.INFER))
    second = queue.enqueue(Stage.INFER, "b", 2.0, any_payload(Stage.INFER))
    with psycopg.connect(dsn) as other:  # a lease in progress elsewhere, not committed
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first,))
        began = time.monotonic()
        job = queue.lease([Stage.INFER], "w2", 30, now=10.0)
        assert time.monotonic() - began < 1.0
        assert job is not None and job.id == second
        other.rollback()
    again = queue.lease([Stage.INFER], "w3", 30, now=10.0)
    assert again is not None and again.id == first


def test_concurrent_workers_lease_every_job_exactly_once(dsn: str) -> None:
    setup = PostgresQueue(dsn)
    ids = {
        setup.enqueue(Stage.INFER, f"s{i}", float(i), any_payload(Stage.INFER)) for i in range(60)
    }
    setup.close()
    barrier = threading.Barrier(6)
    leased: list[int] = []
    lock = threading.Lock()
    queues = [PostgresQueue(dsn) for _ in range(6)]

    def worker(q: PostgresQueue, name: str) -> None:
        barrier.wait()
        while (job := q.lease([Stage.INFER], name, 30, now=100.0)) is not None:
            with lock:
                leased.append(job.id)
            q.complete(job, now=101.0)

    threads = [threading.Thread(target=worker, args=(q, f"w{n}")) for n, q in enumerate(queues)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for q in queues:
            q.close()
    assert sorted(leased) == sorted(ids)  # none twice, none missed


def test_a_job_whose_payload_no_worker_can_read_is_a_dead_letter_saying_why(
    queue: PostgresQueue, dsn: str
) -> None:
    _sql(
        dsn,
        "INSERT INTO jobs (stage, subject, state, run_at, payload, created_at, updated_at)"
        " VALUES ('infer', 'bad', 'ready', 1.0, '{\"kind\": \"dicom\"}', 1.0, 1.0)",
    )
    good = queue.enqueue(Stage.INFER, "good", 2.0, InferPayload("m", Kind.DICOM, "good"))
    job = queue.lease([Stage.INFER], "w", 30, now=3.0)
    assert job is not None and job.id == good
    (dead,) = queue.dead_jobs()
    assert dead.subject == "bad" and dead.state is JobState.DEAD
    assert dead.last_error is not None and dead.last_error.startswith("unreadable job payload")


def test_a_failed_job_racing_a_new_waiting_job_for_its_subject_is_superseded(
    queue: PostgresQueue, dsn: str
) -> None:
    """Another node enqueues the same (stage, subject) while this one fails its job: the
    fail collides on the one-ready index, runs again, and closes the old job as
    superseded instead of raising."""
    queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE, 1))
    job = queue.lease([Stage.ROUTE], "w", 30, now=10.0)
    assert job is not None
    errors: list[BaseException] = []
    with psycopg.connect(dsn) as other:
        other.execute(
            SQL["enqueue"],
            {
                "stage": "route",
                "subject": "study",
                "run_at": 11.0,
                "now": 11.0,
                "lane": "",
                "payload": '{"kind": "dicom", "generation": 2, "reopened": true}',
            },
        )  # not committed yet: the fail below waits for it

        def fail() -> None:
            try:
                queue.fail(job, "router crashed", retry_at=20.0, now=12.0)
            except BaseException as exc:
                errors.append(exc)

        failing = threading.Thread(target=fail)
        failing.start()
        time.sleep(0.3)
        other.commit()
    failing.join(10)
    assert errors == []
    assert queue.counts()["jobs:route"] == {"ready": 1, "done": 1}
    stored = queue.job(job.id)
    assert stored is not None and (stored.last_error or "").startswith("superseded")


# --- LISTEN/NOTIFY ------------------------------------------------------------------------


def test_wait_for_jobs_wakes_within_a_second_of_an_enqueue_elsewhere(
    queue: PostgresQueue, dsn: str
) -> None:
    other = PostgresQueue(dsn)
    queue.listen()
    enqueued_at: list[float] = []

    def enqueue_later() -> None:
        time.sleep(0.3)
        other.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
        enqueued_at.append(time.monotonic())

    try:
        thread = threading.Thread(target=enqueue_later)
        thread.start()
        assert queue.wait_for_jobs(timeout=10.0) is True
        woke_at = time.monotonic()
        thread.join()
        assert woke_at - enqueued_at[0] < 1.0
        assert queue.lease([Stage.ROUTE], "w", 30, now=2.0) is not None
    finally:
        other.close()


def test_wait_for_jobs_returns_false_when_the_timeout_passes(queue: PostgresQueue) -> None:
    began = time.monotonic()
    assert queue.wait_for_jobs(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - began < 2.0


def test_notifications_sent_while_nobody_waits_are_kept_and_a_burst_coalesces(
    queue: PostgresQueue, dsn: str
) -> None:
    """Enqueued between two waits: the next wait returns at once.  A burst wakes once
    for what has arrived by then; a straggler the server forwards a moment later may
    wake it once more (harmless: the worker finds nothing and waits again)."""
    other = PostgresQueue(dsn)
    try:
        queue.listen()
        for n in range(5):
            other.enqueue(Stage.INFER, f"s{n}", 1.0, any_payload(Stage.INFER))
        began = time.monotonic()
        assert queue.wait_for_jobs(timeout=5.0) is True
        assert time.monotonic() - began < 1.0
        wakes = 0
        while queue.wait_for_jobs(timeout=0.3):
            wakes += 1
            assert wakes < 5
    finally:
        other.close()


@pytest.mark.parametrize("action", ["next job", "fail", "replay", "sweep"])
def test_every_way_a_job_becomes_ready_wakes_waiting_workers(dsn: str, action: str) -> None:
    q = PostgresQueue(dsn)
    listener = PostgresQueue(dsn)
    try:
        q.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
        job = q.lease([Stage.ROUTE], "w", 30, now=2.0)
        assert job is not None
        if action == "replay":
            q.dead(job, "gave up", now=3.0)
        listener.listen()  # from here on
        if action == "next job":
            q.complete(job, now=3.0, then=[NextJob(Stage.INFER, "s", any_payload(Stage.INFER))])
        elif action == "fail":
            q.fail(job, "peer down", retry_at=4.0, now=3.0)
        elif action == "replay":
            assert q.replay(None, now=4.0) == 1
        else:
            assert q.sweep_expired(now=100.0) == 1
        assert listener.wait_for_jobs(timeout=5.0) is True
    finally:
        listener.close()
        q.close()


def test_bookkeeping_that_leaves_no_job_ready_wakes_nobody(queue: PostgresQueue, dsn: str) -> None:
    queue.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
    listener = PostgresQueue(dsn)
    try:
        listener.listen()
        job = queue.lease([Stage.ROUTE], "w", 30, now=2.0)
        assert job is not None
        job = queue.heartbeat(job, 30, now=3.0)
        queue.complete(job, now=4.0)
        assert listener.wait_for_jobs(timeout=0.3) is False
    finally:
        listener.close()


# --- durability settings ------------------------------------------------------------------


def test_bookkeeping_commits_do_not_wait_for_the_flush_but_ingest_does(dsn: str) -> None:
    durable, bookkeeping = PostgresQueue(dsn), PostgresQueue(dsn, durable=False)
    try:
        with durable._pool.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == {
                "synchronous_commit": "on"
            }
        with bookkeeping._pool.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == {
                "synchronous_commit": "off"
            }
        seen: list[object] = []
        bookkeeping._write(
            lambda cur: seen.append(cur.execute("SHOW synchronous_commit").fetchone()),
            ingest=True,
        )
        assert seen == [{"synchronous_commit": "on"}]
        ack = bookkeeping.record_instance(instance("1.2.3"), b"attrs", QUIET)
        assert durable.find("dicom:1.2.3") == ack.envelope_id
    finally:
        durable.close()
        bookkeeping.close()


# --- connection failures ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_server_is_queue_unavailable_naming_host_and_port_quickly() -> None:
    port = _closed_port()
    began = time.monotonic()
    with pytest.raises(QueueUnavailable) as caught:
        PostgresQueue(f"postgresql://gw:s3cret-pw@127.0.0.1:{port}/gateway", timeout=2.0)
    assert time.monotonic() - began < 5.0
    assert f"127.0.0.1:{port}" in caught.value.message
    assert "s3cret-pw" not in caught.value.message


def test_a_server_that_never_answers_times_out_in_seconds_not_minutes() -> None:
    """A peer that accepts the TCP connection and then says nothing (a hung server, a
    firewall that drops): the connect timeout ends the wait."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(QueueUnavailable, match=rf"127\.0\.0\.1:{port}"):
            PostgresQueue(f"postgresql://gw:pw@127.0.0.1:{port}/gateway", timeout=1.0)
        assert time.monotonic() - began < 5.0


def test_a_connection_string_libpq_cannot_read_is_reported_without_quoting_it() -> None:
    with pytest.raises(QueueUnavailable) as caught:
        PostgresQueue("host=127.0.0.1 password=s3cret-pw oops")
    assert "s3cret-pw" not in caught.value.message


def test_a_server_gone_while_open_is_queue_unavailable(dsn: str) -> None:
    q = PostgresQueue(dsn)
    try:
        q.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
        with q._pool.connection() as conn:
            pid = conn.info.backend_pid
        _sql(dsn, f"SELECT pg_terminate_backend({pid}, 5000)")  # waits until it is gone
        # the pool checks a connection before lending it: the one that died while idle
        # (the server closed its socket) is replaced
        assert q.lease([Stage.ROUTE], "w", 30, now=2.0) is not None
    finally:
        q.close()
    with pytest.raises(QueueUnavailable, match=r"127\.0\.0\.1"):
        q.lease([Stage.ROUTE], "w", 30, now=3.0)  # closed: no connection to lend


# --- choosing the engine ------------------------------------------------------------------


def test_open_queue_chooses_the_engine_from_the_database_url(tmp_path: Path, dsn: str) -> None:
    default = open_queue(tmp_path)
    named = open_queue(tmp_path, database="sqlite:other.sqlite3")
    absolute = open_queue(tmp_path, database=f"sqlite://{tmp_path / 'abs.sqlite3'}")
    shared = open_queue(tmp_path, database=dsn, durable=False)
    also = open_queue(tmp_path, database=dsn.replace("postgresql://", "postgres://", 1))
    try:
        assert isinstance(default, SQLiteQueue) and default.path == tmp_path / "queue.sqlite3"
        assert isinstance(named, SQLiteQueue) and named.path == tmp_path / "other.sqlite3"
        assert isinstance(absolute, SQLiteQueue) and absolute.path == tmp_path / "abs.sqlite3"
        assert isinstance(shared, PostgresQueue) and isinstance(also, PostgresQueue)
        shared.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
        assert also.counts()["jobs:route"] == {"ready": 1}
    finally:
        for q in (default, named, absolute, shared, also):
            q.close()
    with pytest.raises(ConfigError, match="unknown queue engine 'mysql'") as caught:
        open_queue(tmp_path, database="mysql://root:s3cret-pw@db/gw")
    assert "s3cret-pw" not in str(caught.value)


# --- the harness --------------------------------------------------------------------------


def test_a_missing_postgresql_skips_locally_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL tests skipped: no initdb"):
        pg._unavailable("no initdb")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is required under CI"):
        pg._unavailable("no initdb")


def test_the_password_file_reaches_libpq_and_no_message(tmp_path: Path) -> None:
    """``gateway.database_password_file``: its content is the connection's password; every
    message names the database by host, port and name only."""
    (tmp_path / "pw").write_text("s3cret-pw\n")
    config = tmp_path / "gw.yaml"
    config.write_text(
        "gateway:\n  database: postgresql://gw@db.example:6543/gateway\n"
        "  database_password_file: pw\n"
        "dicom:\n  allowed_callers: [{ae_title: PACS, hosts: [127.0.0.1]}]\n"
        "hl7:\n  allowed_senders: [{application: EHR, facility: HOSP, hosts: [127.0.0.1]}]\n"
    )
    cfg = read_config(config)
    password = database_password(cfg)
    assert password == "s3cret-pw"
    assert conninfo_to_dict(_dsn(str(cfg.gateway.database), password))["password"] == "s3cret-pw"
    label = database_label(cfg.gateway.database, cfg.data_dir)
    assert label == "db.example:6543/gateway" and "s3cret" not in label
