"""The worker loop: one place that turns a handler's outcome into queue transitions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.envelope import Job, NextJob, Stage
from gateway.errors import Permanent, Transient
from gateway.store.postgres import PostgresQueue
from gateway.store.sqlite import SQLiteQueue
from gateway.workers import Beat, JobWaker, Worker
from tests.queues import any_payload


@dataclass(frozen=True)
class FixedPolicy:
    delay: float = 10.0
    give_up_after: float = 100.0

    def decide(
        self, *, attempts: int, first_failure_at: float, now: float, rand: float
    ) -> float | None:
        return None if now - first_failure_at >= self.give_up_after else now + self.delay


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteQueue]:
    q = SQLiteQueue(tmp_path / "q.sqlite3")
    yield q
    q.close()


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worker(queue: SQLiteQueue, handler: object, clock: Clock, **kw: object) -> Worker:
    return Worker(
        "w",
        queue,
        [Stage.ROUTE, Stage.DELIVER],
        handler,  # type: ignore[arg-type]
        lambda job: FixedPolicy(),
        clock=clock,
        rand=lambda: 0.5,
        **kw,
    )  # type: ignore[arg-type]


def row(queue: SQLiteQueue, job_id: int) -> dict[str, object]:
    return dict(queue._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def test_success_completes_and_enqueues_the_next_jobs(queue: SQLiteQueue) -> None:
    first = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        beat()
        return [NextJob(Stage.DELIVER, "pacs|study", any_payload(Stage.DELIVER), lane="pacs")]

    assert worker(queue, handler, Clock()).run_once()
    assert row(queue, first)["state"] == "done"
    nxt = queue.lease([Stage.DELIVER], "x", 30, now=200.0, lane="pacs")
    assert nxt is not None and nxt.payload == any_payload(Stage.DELIVER)


def test_no_ready_job_means_no_work(queue: SQLiteQueue) -> None:
    assert not worker(queue, lambda job, beat: [], Clock()).run_once()


def test_transient_failure_is_retried_at_the_policy_time_keeping_the_error(
    queue: SQLiteQueue,
) -> None:
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        raise Transient("peer down")

    clock = Clock(100.0)
    worker(queue, handler, clock).run_once()
    r = row(queue, job_id)
    assert (r["state"], r["run_at"], r["last_error"], r["first_failed_at"]) == (
        "ready",
        110.0,
        "peer down",
        100.0,
    )


def test_transient_failures_become_a_dead_letter_once_the_policy_gives_up(
    queue: SQLiteQueue,
) -> None:
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        raise Transient("peer down")

    clock = Clock(100.0)
    w = worker(queue, handler, clock)
    while w.run_once():
        clock.now += 30
    r = row(queue, job_id)
    assert r["state"] == "dead"
    assert r["last_error"] == "gave up after 5 attempts: peer down"
    assert [j.id for j in queue.dead_jobs()] == [job_id]


def test_permanent_failure_is_a_dead_letter_at_once(queue: SQLiteQueue) -> None:
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        raise Permanent("destination refused (AR): unknown patient")

    worker(queue, handler, Clock()).run_once()
    r = row(queue, job_id)
    assert (r["state"], r["attempts"], r["last_error"]) == (
        "dead",
        1,
        "destination refused (AR): unknown patient",
    )


def test_a_bug_in_a_handler_is_retried_not_lost_and_its_text_is_not_kept(
    queue: SQLiteQueue,
) -> None:
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        raise KeyError("DOE^JANE")

    worker(queue, handler, Clock()).run_once()
    r = row(queue, job_id)
    assert r["state"] == "ready"
    assert r["last_error"] == "internal error (KeyError); see gateway log"


def test_a_worker_whose_lease_was_taken_over_changes_nothing(queue: SQLiteQueue) -> None:
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))
    clock = Clock(100.0)

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        clock.now += 1000  # stuck far beyond the lease
        queue.sweep_expired(clock.now)
        taken = queue.lease([Stage.ROUTE], "other", 30, clock.now)
        assert taken is not None
        return [NextJob(Stage.DELIVER, "x", any_payload(Stage.DELIVER))]

    worker(queue, handler, clock, lease_seconds=10).run_once()
    assert row(queue, job_id)["state"] == "leased"
    assert row(queue, job_id)["worker"] == "other"
    assert "jobs:deliver" not in queue.counts()


def test_the_lease_is_kept_while_a_handler_waits_longer_than_it(queue: SQLiteQueue) -> None:
    """A handler blocked in one call (a peer answering after a minute) calls no beat: the
    started worker renews the lease itself, so a sweep meanwhile leaves the job leased and
    the handler's outcome is kept."""
    job_id = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))
    swept: list[int] = []
    finished = threading.Event()

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        for _ in range(6):  # 1.5 s against a 0.5 s lease, without a beat
            time.sleep(0.25)
            swept.append(queue.sweep_expired(time.time()))
        beat()  # the lease is still ours
        return [NextJob(Stage.DELIVER, "pacs|study", any_payload(Stage.DELIVER), lane="pacs")]

    w = Worker(
        "w",
        queue,
        [Stage.ROUTE],
        handler,
        lambda job: FixedPolicy(),
        lease_seconds=0.5,
        idle_wait=0.05,
        on_outcome=lambda job, outcome: finished.set(),
    )
    w.start()
    try:
        assert finished.wait(10)
    finally:
        assert w.stop(5)
    assert swept == [0] * 6
    assert row(queue, job_id)["state"] == "done"
    assert queue.counts()["jobs:deliver"] == {"ready": 1}


def test_lanes_keep_a_stuck_destination_from_delaying_others(queue: SQLiteQueue) -> None:
    queue.enqueue(Stage.DELIVER, "down|s1", 1.0, any_payload(Stage.DELIVER), lane="down")
    up = queue.enqueue(Stage.DELIVER, "up|s1", 2.0, any_payload(Stage.DELIVER), lane="up")
    seen: list[str] = []

    def handler(job: Job, beat: Beat) -> Sequence[NextJob]:
        seen.append(job.subject)
        return []

    w = Worker(
        "up", queue, [Stage.DELIVER], handler, lambda job: FixedPolicy(), lane="up", clock=Clock()
    )
    assert w.run_once() and not w.run_once()
    assert seen == ["up|s1"] and row(queue, up)["state"] == "done"


def test_a_restarted_gateway_resumes_jobs_of_its_dead_predecessor_at_once(
    queue: SQLiteQueue,
) -> None:
    import socket
    import subprocess

    from gateway.workers import worker_alive

    dead_pid = subprocess.Popen(["true"])  # a pid that existed and has exited
    dead_pid.wait()
    host = socket.gethostname()
    queue.enqueue(Stage.ROUTE, "a", 1.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.ROUTE, "b", 1.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.ROUTE, "c", 1.0, any_payload(Stage.ROUTE))
    queue.lease([Stage.ROUTE], f"{host}:{dead_pid.pid}:route", 300, now=2.0)  # crashed
    queue.lease([Stage.ROUTE], "otherhost:1:route", 300, now=2.0)  # elsewhere: unknown
    queue.lease([Stage.ROUTE], f"{host}:1:route", 300, now=2.0)  # pid 1 is alive
    assert queue.release_dead_workers(worker_alive, now=3.0) == 1
    assert queue.counts()["jobs:route"] == {"ready": 1, "leased": 2}


def test_a_worker_whose_process_exited_but_is_not_reaped_is_dead() -> None:
    """kill -9 of a gateway leaves its worker children to init, which may reap them late:
    a zombie answers kill(pid, 0), but its leases must be released at once."""
    import socket
    import subprocess
    import time

    from gateway.workers import worker_alive

    child = subprocess.Popen(["true"])  # exits at once; not waited for: a zombie
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    try:
        assert not worker_alive(f"{socket.gethostname()}:{child.pid}:deliver-ehr")
        assert worker_alive(f"{socket.gethostname()}:1:deliver-ehr")  # pid 1 lives
    finally:
        child.wait()


def test_a_job_enqueued_on_another_node_wakes_idle_workers_at_once(
    pg_dsn: Callable[[], str],
) -> None:
    """PostgreSQL: the waker listens for ready jobs (NOTIFY) and wakes this process's
    workers, so an idle worker need not poll; a stop returns within its wait."""
    dsn = pg_dsn()
    mine, theirs = PostgresQueue(dsn), PostgresQueue(dsn)
    woken = threading.Event()
    waker = JobWaker(mine, woken.set)
    waker.start()
    try:
        assert not woken.wait(0.5)  # nothing ready: nothing wakes
        started = time.monotonic()
        theirs.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))
        assert woken.wait(2.0) and time.monotonic() - started < 2.0
    finally:
        stopping = time.monotonic()
        waker.stop()
        assert time.monotonic() - stopping < JobWaker.WAIT + 1
        mine.close()
        theirs.close()
