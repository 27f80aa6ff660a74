"""What only the SQLite engine has: its file (reopened, shared by two connections), its
schema's checks and its upgrades.  The behaviour every engine shares is the contract suite,
``test_queue.py``."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.envelope import InferPayload, JobState, Kind, RoutePayload, Stage
from gateway.errors import QueueUnavailable
from gateway.store.sqlite import SCHEMA, SCHEMA_VERSION, SQLiteQueue
from tests.unit.test_queue import QUIET, instance


@pytest.fixture
def queue(tmp_path: Path) -> SQLiteQueue:
    return SQLiteQueue(tmp_path / "queue.sqlite3")


def test_queue_survives_reopening_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    q = SQLiteQueue(path)
    env = instance("1.2.3", at=100.0)
    q.record_instance(env, b"attrs", QUIET)
    q.enqueue(Stage.INFER, "s", 1.0, InferPayload("m", Kind.DICOM, "s"))
    job = q.lease([Stage.INFER], "w", 30, now=10.0)
    assert job is not None
    q.close()

    again = SQLiteQueue(path)
    try:
        assert again.find("dicom:1.2.3") == env.id
        assert again.envelope(env.id)[1] == b"attrs"
        assert again.counts()["jobs:infer"] == {"leased": 1}
        again.complete(job, now=11.0)  # the lease token is durable too
        assert again.counts()["jobs:infer"] == {"done": 1}
        version = again._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        assert version["value"] == str(SCHEMA_VERSION)
    finally:
        again.close()


def test_two_connections_to_one_file_see_each_others_commits(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    a, b = SQLiteQueue(path), SQLiteQueue(path)
    try:
        a.enqueue(Stage.ROUTE, "s", 1.0, RoutePayload(Kind.DICOM))
        job = b.lease([Stage.ROUTE], "w", 30, now=10.0)
        assert job is not None
        assert a.lease([Stage.ROUTE], "w", 30, now=10.0) is None
    finally:
        a.close()
        b.close()


# --- schema -------------------------------------------------------------------------------


def _check_set(table: str, column: str) -> set[str]:
    body = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", SCHEMA, re.S)
    assert body is not None
    check = re.search(rf"\b{column}\b[^\n]*CHECK \({column} IN \(([^)]*)\)\)", body.group(1))
    assert check is not None
    return set(re.findall(r"'([^']*)'", check.group(1)))


def test_job_states_in_the_enum_match_the_schema_check_constraint() -> None:
    assert _check_set("jobs", "state") == {s.value for s in JobState}


def test_envelope_kinds_in_the_enum_match_the_schema_check_constraint() -> None:
    assert _check_set("envelopes", "kind") == {k.value for k in Kind}


def test_schema_check_constraint_rejects_an_unknown_job_state(queue: SQLiteQueue) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        queue._db.execute(
            "INSERT INTO jobs (stage, subject, state, run_at, created_at, updated_at)"
            " VALUES ('route', 's', 'paused', 0, 0, 0)"
        )


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A queue made by the first release keeps its rows and gains lanes and deliveries."""
    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '1');"
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, stage TEXT NOT NULL,"
        " subject TEXT NOT NULL, state TEXT NOT NULL, run_at REAL NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, lease_token TEXT, lease_expires REAL,"
        " worker TEXT, last_error TEXT, payload TEXT NOT NULL DEFAULT '{}',"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL);"
        "INSERT INTO jobs (stage, subject, state, run_at, created_at, updated_at)"
        " VALUES ('route', 'study-1', 'ready', 1.0, 1.0, 1.0);"
    )
    db.commit()
    db.close()
    queue = SQLiteQueue(path)
    try:
        job = queue.lease([Stage.ROUTE], "w", 30, now=2.0)
        assert job is not None and (job.subject, job.lane) == ("study-1", "")
        queue.record_delivery("env-1", "pacs", 0, now=3.0)
        assert queue.delivered("pacs", ["env-1", "env-2"]) == {"env-1"}
    finally:
        queue.close()


def test_a_job_whose_payload_no_worker_can_read_is_a_dead_letter_saying_why(
    queue: SQLiteQueue,
) -> None:
    """A row written by a newer version, or edited by hand: the lease moves on to the next
    job, and the unreadable one is listed as dead with the reason, its payload kept."""
    queue._db.execute(
        "INSERT INTO jobs (stage, subject, state, run_at, payload, created_at, updated_at)"
        " VALUES ('infer', 'bad', 'ready', 1.0, '{\"kind\": \"dicom\"}', 1.0, 1.0)"
    )
    good = queue.enqueue(Stage.INFER, "good", 2.0, InferPayload("m", Kind.DICOM, "good"))
    job = queue.lease([Stage.INFER], "w", 30, now=3.0)
    assert job is not None and job.id == good
    (dead,) = queue.dead_jobs()
    assert dead.subject == "bad" and dead.state is JobState.DEAD
    assert dead.last_error is not None and dead.last_error.startswith("unreadable job payload")
    assert "model" in dead.last_error


def _hold_write_lock(path: Path, seconds: float, held: threading.Event) -> None:
    """Another process's write transaction: a second connection holding the write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


def test_a_write_waits_for_another_connections_transaction_in_short_steps(
    tmp_path: Path,
) -> None:
    """SQLite's busy handler would sleep 1, 2, 5, 10 ... ms between tries; the queue
    tries again within about 2 ms of the other transaction's end."""
    queue = SQLiteQueue(tmp_path / "queue.db")
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(queue.path, 0.3, held))
    holder.start()
    held.wait(5)
    started = time.monotonic()
    assert queue.record_instance(instance("1.2.3"), b"", QUIET).new
    waited = time.monotonic() - started
    holder.join()
    assert 0.29 <= waited < 5.0
    # the connection's own busy timeout is back for everything else
    assert queue._db.execute("PRAGMA busy_timeout").fetchone()[0] == 10000
    queue.close()


def test_a_write_lock_held_past_the_busy_timeout_is_a_transient_error(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "queue.db", busy_timeout=0.3)
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(queue.path, 1.5, held))
    holder.start()
    held.wait(5)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable, match="queue database is busy"):
        queue.record_instance(instance("1.2.4"), b"", QUIET)
    assert 0.29 <= time.monotonic() - started < 1.4  # its own timeout, not the holder's
    holder.join()
    assert queue.record_instance(instance("1.2.4"), b"", QUIET).new  # and then it works
    queue.close()
