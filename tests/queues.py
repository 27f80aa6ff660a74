"""The queue engines the contract suite runs against, each opened fresh for one test."""

from __future__ import annotations

from pathlib import Path

from gateway.envelope import (
    BuildPayload,
    DeliverPayload,
    InferPayload,
    Kind,
    Payload,
    RoutePayload,
    Stage,
)
from gateway.store.postgres import PostgresQueue
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue
from tests import pg

#: PostgreSQL runs on a throwaway server started once per session (tests/pg.py); without
#: its binaries those tests are skipped (failed under CI)
BACKENDS = ["sqlite", "postgresql"]


def open_test_queue(backend: str, tmp_path: Path) -> Queue:
    if backend == "sqlite":
        return SQLiteQueue(tmp_path / "queue.sqlite3")
    if backend == "postgresql":
        return PostgresQueue(pg.new_dsn())
    raise ValueError(f"unknown queue backend {backend!r}")


def reopen_test_queue(queue: Queue) -> Queue:
    """Another connection to the same database: what another process or node would hold."""
    if isinstance(queue, SQLiteQueue):
        return SQLiteQueue(queue.path)
    if isinstance(queue, PostgresQueue):
        return PostgresQueue(queue.dsn)
    raise TypeError(f"no test reopening for {type(queue).__name__}")


def any_payload(stage: Stage, generation: int = 0) -> Payload:
    """A payload of the record *stage* takes, for tests where its content does not matter."""
    if stage is Stage.ROUTE:
        return RoutePayload(Kind.DICOM, generation)
    if stage is Stage.DELIVER:
        return DeliverPayload("pacs", Kind.DICOM, "s", "forward")
    if stage is Stage.BUILD:
        return BuildPayload("m", Kind.DICOM, "s", result="r")
    return InferPayload("m", Kind.DICOM, "s")
