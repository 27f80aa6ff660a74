"""Which queue engine a gateway uses: :func:`open_queue`, the one place that chooses."""

from __future__ import annotations

import threading
from pathlib import Path

from gateway.errors import ConfigError
from gateway.store.postgres import PostgresQueue
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue

QUEUE_FILE = "queue.sqlite3"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_queue(
    data_dir: Path,
    *,
    database: str | None = None,
    durable: bool = True,
    lock: threading.Lock | None = None,
) -> Queue:
    """The queue of the gateway whose data lives in *data_dir*.

    *database* chooses the engine:

    - ``None`` or ``sqlite:``: the embedded SQLite file ``data_dir/queue.sqlite3`` (one
      node); ``sqlite:NAME`` is another file in *data_dir*, ``sqlite:///abs/path`` (or
      ``sqlite:/abs/path``) a file anywhere;
    - ``postgresql://...`` or ``postgres://...`` (a libpq URL): PostgreSQL, shared by any
      number of nodes (:class:`~gateway.store.postgres.PostgresQueue`).

    Either is created, or upgraded, on first use.  *durable*: every commit is durable
    before it returns (the ingest edges need that); workers' bookkeeping may take
    ``durable=False``, with the ingest queue's *lock* on SQLite (see
    :class:`~gateway.store.sqlite.SQLiteQueue`; PostgreSQL needs no lock and ignores it).
    Anything else is a :class:`~gateway.errors.ConfigError` naming the scheme only (a URL
    may hold a password).
    """
    if database is None or database.startswith("sqlite:"):
        return SQLiteQueue(_sqlite_path(data_dir, database), durable=durable, lock=lock)
    if database.startswith(POSTGRES_SCHEMES):
        return PostgresQueue(database, durable=durable)
    scheme = database.split(":", 1)[0] if ":" in database else "(none)"
    raise ConfigError(
        [
            f"database: unknown queue engine {scheme!r}: use sqlite: or postgresql://"
            "user@host:port/dbname"
        ]
    )


def _sqlite_path(data_dir: Path, database: str | None) -> Path:
    rest = (database or "").removeprefix("sqlite:").removeprefix("//")
    if not rest:
        return data_dir / QUEUE_FILE
    path = Path(rest)
    return path if path.is_absolute() else data_dir / path
