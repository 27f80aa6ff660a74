"""Queue engines side by side: SQLite and PostgreSQL on the same operations, one run.

    python -m bench.queue [--jobs 2000] [--instances 1000] [--workers 4]

For each engine, on a fresh queue (SQLite: a file in a scratch directory; PostgreSQL: an
empty database on a throwaway server from ``tests/pg.py``, fsync on):

- ``ingest/s``: ``record_instance`` of new instances into one study, one thread, durable
  (each returns after its commit is flushed: what a C-STORE response waits for);
- ``cycle/s``: enqueue + lease + complete of one job, one thread, on the workers'
  ``durable=False`` queue (bookkeeping commits not flushed one by one);
- ``lease+complete/s with N workers``: N threads, each with its own queue object, draining
  ``--jobs`` ready jobs (PostgreSQL: SKIP LOCKED lets them run side by side; SQLite:
  one writer at a time).

Results: printed, and bench/out/queue.json.  Numbers depend on the disk's flush time.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench import OUT, log, scratch_dir
from gateway.envelope import Envelope, InferPayload, Kind, Stage, new_id
from gateway.store.postgres import PostgresQueue
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue
from tests import pg

PAYLOAD = InferPayload("m", Kind.DICOM, "s")


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def ingest(q: Queue, count: int) -> float:
    began = time.perf_counter()
    for n in range(count):
        env = Envelope(
            id=new_id(),
            kind=Kind.DICOM,
            source="BENCH@127.0.0.1",
            received_at=100.0 + n,
            dedup_key=f"dicom:{n}",
            spool_key=f"spool-{n}",
            study_key="study",
            size=10,
        )
        q.record_instance(env, b"sealed-attrs" * 8, 5.0)
    return _rate(count, time.perf_counter() - began)


def cycles(q: Queue, count: int) -> float:
    began = time.perf_counter()
    for n in range(count):
        q.enqueue(Stage.INFER, f"c{n}", 1.0, PAYLOAD)
        job = q.lease([Stage.INFER], "w", 30, now=2.0)
        assert job is not None
        q.complete(job, now=3.0)
    return _rate(count, time.perf_counter() - began)


def drain(open_worker: Callable[[], Queue], setup: Queue, count: int, workers: int) -> float:
    for n in range(count):
        setup.enqueue(Stage.INFER, f"d{n}", 1.0, PAYLOAD)
    queues = [open_worker() for _ in range(workers)]
    done = [0] * workers
    barrier = threading.Barrier(workers + 1)

    def work(i: int) -> None:
        q = queues[i]
        barrier.wait()
        while (job := q.lease([Stage.INFER], f"w{i}", 30, now=5.0)) is not None:
            q.complete(job, now=6.0)
            done[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    for q in queues:
        q.close()
    assert sum(done) == count
    return _rate(count, seconds)


def run(name: str, open_q: Callable[[bool], Queue], args: argparse.Namespace) -> dict[str, float]:
    durable, bookkeeping = open_q(True), open_q(False)
    try:
        out = {
            "ingest/s": ingest(durable, args.instances),
            "cycle/s": cycles(bookkeeping, args.jobs),
            f"lease+complete/s with {args.workers} workers": drain(
                lambda: open_q(False), bookkeeping, args.jobs, args.workers
            ),
        }
    finally:
        durable.close()
        bookkeeping.close()
    log(f"{name}: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, object] = {}

    scratch: Path = scratch_dir("queue-bench-")
    lock = threading.Lock()
    results["sqlite"] = run(
        "sqlite",
        lambda durable: SQLiteQueue(scratch / "queue.sqlite3", durable=durable, lock=lock),
        args,
    )

    began = time.monotonic()
    pg.server()
    started = round(time.monotonic() - began, 2)
    dsn = pg.new_dsn()
    try:
        results["postgresql"] = run(
            "postgresql", lambda durable: PostgresQueue(dsn, durable=durable), args
        )
    finally:
        pg.stop()
    results["postgresql server start (s)"] = started
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "queue.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
