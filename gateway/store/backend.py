"""Which queue engine a gateway uses: :func:`open_queue`, the one place that chooses."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.errors import QueueUnavailable
from gateway.store import sqlite
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue

QUEUE_FILE = "queue.sqlite3"


def open_queue(
    data_dir: Path,
    *,
    database: str | None = None,
    password: str | None = None,
    durable: bool = True,
    lock: threading.Lock | None = None,
) -> Queue:
    """The queue of the gateway whose data lives in *data_dir*: the embedded SQLite file
    ``data_dir/queue.sqlite3`` (created, or upgraded, on first use).

    *durable*: every commit is fsync'd before it returns (the ingest edges need that);
    workers' bookkeeping may take ``durable=False`` with the ingest queue's *lock* (see
    :class:`~gateway.store.sqlite.SQLiteQueue`).
    """
    if database is not None:
        raise QueueUnavailable(f"{database_label(database, data_dir)}: not available yet")
    return SQLiteQueue(data_dir / QUEUE_FILE, durable=durable, lock=lock)


def database_label(database: str | None, data_dir: Path) -> str:
    """The queue database in words, for messages: the SQLite file, or the PostgreSQL URL
    (which never holds a password: the config refuses one)."""
    return str(data_dir / QUEUE_FILE) if database is None else database


def database_password(cfg: Config) -> str | None:
    """The PostgreSQL password from ``gateway.database_password_file`` (None: libpq's own
    ways, such as the PGPASSWORD environment variable or ~/.pgpass)."""
    path = cfg.gateway.database_password_file
    if path is None:
        return None
    try:
        return cfg.path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise QueueUnavailable(
            f"cannot read database_password_file {cfg.path(path)}: {exc.strerror}"
        ) from None


@dataclass(frozen=True)
class SchemaStatus:
    """Where a queue database stands: ``current`` is its schema version (None: not
    created yet), ``target`` this gateway's, ``pending`` the migrations ``gateway db
    migrate`` (or the next start) would apply."""

    engine: str
    database: str
    current: int | None
    target: int

    @property
    def pending(self) -> list[int]:
        if self.current is None:
            return [self.target]
        return list(range(self.current + 1, self.target + 1))

    @property
    def newer(self) -> bool:
        """The database was made by a newer gateway: this one refuses to use it."""
        return self.current is not None and self.current > self.target


def schema_status(cfg: Config) -> SchemaStatus:
    """The schema of the queue database *cfg* names, read without changing it."""
    if cfg.gateway.database is not None:
        raise QueueUnavailable(f"{cfg.gateway.database}: not available yet")
    path = cfg.data_dir / QUEUE_FILE
    return SchemaStatus("sqlite", str(path), sqlite.schema_version(path), sqlite.SCHEMA_VERSION)


def migrate_database(cfg: Config) -> list[int]:
    """Create or upgrade the queue database *cfg* names; the versions applied."""
    if cfg.gateway.database is not None:
        raise QueueUnavailable(f"{cfg.gateway.database}: not available yet")
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return sqlite.migrate(cfg.data_dir / QUEUE_FILE)
