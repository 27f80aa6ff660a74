"""The wall clock stepping back an hour (an NTP correction, a VM snapshot restored): the
queue's stored times must not make quiet periods, run times and leases an hour longer.
Run against every engine, like the contract suite (``test_queue.py``); the same steps on
a running gateway are drilled in ``tests/integration/test_clock.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gateway.envelope import Envelope, Job, JobState, Kind, NextJob, Stage, new_id
from gateway.store.queue import Queue
from gateway.store.sqlite import SQLiteQueue
from gateway.workers import Beat, Worker
from tests.queues import BACKENDS, any_payload, open_test_queue

T = 1_800_000_000.0  # when the tests' instances arrive, before the step
HOUR = 3600.0
QUIET = 5.0


@pytest.fixture(params=BACKENDS)
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    q = open_test_queue(request.param, tmp_path)
    yield q
    q.close()


def instance(sop: str, at: float, study: str = "study-1") -> Envelope:
    return Envelope(
        id=new_id(),
        kind=Kind.DICOM,
        source="PACS@127.0.0.1",
        received_at=at,
        dedup_key=f"dicom:{sop}",
        spool_key=f"spool-{sop}",
        study_key=study,
        size=10,
    )


def job(queue: Queue, job_id: int) -> Job:
    found = queue.job(job_id)
    assert found is not None
    return found


def test_a_step_back_keeps_what_was_left_of_a_quiet_period(queue: Queue) -> None:
    queue.record_instance(instance("1", T), b"attrs", QUIET)
    back = T + 1 - HOUR  # a second later, the clock is an hour behind
    assert queue.complete_due_studies(back) == []
    info = queue.study("study-1")
    assert info is not None and info.state == "open"
    assert (info.last_at, info.complete_due) == (back, back + QUIET)
    assert queue.next_study_due() == back + QUIET
    assert queue.complete_due_studies(back + QUIET - 0.1) == []
    assert queue.complete_due_studies(back + QUIET) == ["study-1"]


def test_a_step_back_within_the_slack_moves_nothing(queue: Queue) -> None:
    """Nodes whose clocks differ by a few seconds are not a step: nothing is rewritten."""
    queue.record_instance(instance("1", T), b"attrs", QUIET)
    assert queue.complete_due_studies(T - 5.0) == []
    info = queue.study("study-1")
    assert info is not None and (info.last_at, info.complete_due) == (T, T + QUIET)


def test_a_late_instance_after_a_step_back_restarts_the_quiet_period_in_the_new_time(
    queue: Queue,
) -> None:
    queue.record_instance(instance("1", T), b"attrs", QUIET)
    back = T - HOUR
    queue.record_instance(instance("2", back), b"attrs", QUIET)
    assert queue.complete_due_studies(back + QUIET - 0.1) == []
    assert queue.complete_due_studies(back + QUIET) == ["study-1"]


def test_a_waiting_job_written_before_a_step_back_runs_when_it_was_due(queue: Queue) -> None:
    queue.enqueue(Stage.ROUTE, "now", T, any_payload(Stage.ROUTE))
    held = queue.lease([Stage.ROUTE], "w", 30, T)
    assert held is not None
    queue.fail(held, "peer down", retry_at=T + 10, now=T)  # a retry due in 10 s
    back = T + 1 - HOUR  # a second later, the clock is an hour behind
    assert queue.lease([Stage.ROUTE], "w", 30, back) is None
    queue.sweep_expired(back)
    # the wait counts from the step (when the clock stepped is not known: at most the
    # wait is longer by the time between the last write and the step, never shorter)
    assert job(queue, held.id).run_at == pytest.approx(back + 10)
    assert queue.lease([Stage.ROUTE], "w", 30, back + 9.9) is None
    assert queue.lease([Stage.ROUTE], "w", 30, back + 10) is not None


def test_a_lease_taken_before_a_step_back_expires_after_its_own_length(queue: Queue) -> None:
    """A worker on another node died holding it: the sweep takes it back at most one
    lease length after the step, not an hour later."""
    queue.enqueue(Stage.INFER, "s", T, any_payload(Stage.INFER))
    held = queue.lease([Stage.INFER], "other-host:1:infer-0", 30, T)
    assert held is not None
    back = T + 10 - HOUR  # 10 s into the lease, the clock is an hour behind
    assert queue.sweep_expired(back) == 0
    assert job(queue, held.id).lease_expires == pytest.approx(back + 30)
    assert queue.sweep_expired(back + 29.5) == 0
    assert queue.sweep_expired(back + 30.5) == 1
    again = queue.lease([Stage.INFER], "w", 30, back + 31)
    assert again is not None and again.id == held.id


def test_a_job_of_a_dead_worker_runs_at_once_after_a_step_back(queue: Queue) -> None:
    queue.enqueue(Stage.DELIVER, "s", T, any_payload(Stage.DELIVER), lane="pacs")
    held = queue.lease([Stage.DELIVER], "gone", 30, T, lane="pacs")
    assert held is not None
    back = T - HOUR
    assert queue.release_dead_workers(lambda worker: worker != "gone", back) == 1
    again = queue.lease([Stage.DELIVER], "w", 30, back, lane="pacs")
    assert again is not None and again.id == held.id


def test_an_expired_lease_runs_at_once_even_when_its_run_time_is_ahead(queue: Queue) -> None:
    queue.enqueue(Stage.INFER, "s", T, any_payload(Stage.INFER))
    held = queue.lease([Stage.INFER], "w", 30, T)
    assert held is not None
    queue.heartbeat(held, 30, T - HOUR)  # its worker saw the step first: renewed in the new time
    assert queue.sweep_expired(T - HOUR + 31) == 1
    assert job(queue, held.id).run_at == T - HOUR + 31
    assert queue.lease([Stage.INFER], "w", 30, T - HOUR + 31) is not None


class GiveUp:
    def decide(self, *, attempts: int, first_failure_at: float, now: float, rand: float) -> None:
        return None


def test_a_worker_renews_its_lease_after_a_step_back(tmp_path: Path) -> None:
    """The renewals' pace is not measured on the wall clock alone: one stepped back an
    hour does not stop them for an hour (the lease would run out under a working job)."""
    queue = SQLiteQueue(tmp_path / "queue.sqlite3")
    wall = [T]
    queue.enqueue(Stage.ROUTE, "s", T, any_payload(Stage.ROUTE))
    leases: list[float | None] = []

    def handler(held: Job, beat: Beat) -> Sequence[NextJob]:
        wall[0] = T - HOUR
        beat()  # under a tenth of the lease on either clock: no renewal yet
        leases.append(job(queue, held.id).lease_expires)
        time.sleep(0.25)  # a tenth of the lease passes on the monotonic clock
        beat()
        leases.append(job(queue, held.id).lease_expires)
        return []

    worker = Worker(
        "route",
        queue,
        [Stage.ROUTE],
        handler,
        lambda j: GiveUp(),
        lease_seconds=2.0,
        clock=lambda: wall[0],
    )
    assert worker.run_once()
    assert leases == [T + 2.0, T - HOUR + 2.0]
    assert queue.counts()["jobs:route"] == {JobState.DONE.value: 1}
    queue.close()
