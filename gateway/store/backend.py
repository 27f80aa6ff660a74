"""Which queue engine a gateway uses: :func:`open_queue`, the one place that chooses."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import make_conninfo

from gateway.config import Config
from gateway.errors import ConfigError, QueueUnavailable
from gateway.store import postgres, sqlite
from gateway.store.postgres import PostgresQueue
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue

QUEUE_FILE = "queue.sqlite3"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_queue(
    data_dir: Path,
    *,
    database: str | None = None,
    password: str | None = None,
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
        return PostgresQueue(_dsn(database, password), durable=durable)
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


def _dsn(database: str, password: str | None) -> str:
    """The libpq connection string: the URL, with the password from its file added (it is
    never logged: messages name the database with :func:`database_label`)."""
    return database if password is None else make_conninfo(database, password=password)


def _is_postgres(database: str | None) -> bool:
    return database is not None and database.startswith(POSTGRES_SCHEMES)


def database_label(database: str | None, data_dir: Path) -> str:
    """The queue database in words, for messages: the SQLite file, or PostgreSQL's
    host:port/dbname (never a password)."""
    if _is_postgres(database):
        assert database is not None
        return postgres.describe(database)
    return str(_sqlite_path(data_dir, database))


def queue_exists(data_dir: Path, database: str | None, password: str | None = None) -> bool:
    """Whether the queue database was created already (its file, or its schema), read
    without creating anything."""
    if _is_postgres(database):
        assert database is not None
        return postgres.schema_version(_dsn(database, password)) is not None
    return _sqlite_path(data_dir, database).exists()


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
    database = cfg.gateway.database
    label = database_label(database, cfg.data_dir)
    if _is_postgres(database):
        assert database is not None
        current = postgres.schema_version(_dsn(database, database_password(cfg)))
        return SchemaStatus("postgresql", label, current, postgres.SCHEMA_VERSION)
    path = _sqlite_path(cfg.data_dir, database)
    return SchemaStatus("sqlite", label, sqlite.schema_version(path), sqlite.SCHEMA_VERSION)


def migrate_database(cfg: Config) -> list[int]:
    """Create or upgrade the queue database *cfg* names; the versions applied."""
    database = cfg.gateway.database
    if _is_postgres(database):
        assert database is not None
        return postgres.migrate(_dsn(database, database_password(cfg)))
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return sqlite.migrate(_sqlite_path(cfg.data_dir, database))
