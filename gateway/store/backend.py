"""Which queue engine a gateway uses: :func:`open_queue`, the one place that chooses."""

from __future__ import annotations

import threading
from pathlib import Path

from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue

QUEUE_FILE = "queue.sqlite3"


def open_queue(
    data_dir: Path, *, durable: bool = True, lock: threading.Lock | None = None
) -> Queue:
    """The queue of the gateway whose data lives in *data_dir*: the embedded SQLite file
    ``data_dir/queue.sqlite3`` (created, or upgraded, on first use).

    *durable*: every commit is fsync'd before it returns (the ingest edges need that);
    workers' bookkeeping may take ``durable=False`` with the ingest queue's *lock* (see
    :class:`~gateway.store.sqlite.SQLiteQueue`).
    """
    return SQLiteQueue(data_dir / QUEUE_FILE, durable=durable, lock=lock)
