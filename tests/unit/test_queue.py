"""The queue contract's test suite (``gateway/store/queue.py``), run unchanged against
every engine: leases, guarded transitions, dedup, study assembly, deliveries.  What only
one engine has (SQLite's schema and file) is tested beside it: ``test_sqlite_queue.py``."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.envelope import (
    BuildPayload,
    DeliverPayload,
    Envelope,
    InferPayload,
    Job,
    JobState,
    Kind,
    NextJob,
    Payload,
    RoutePayload,
    Stage,
    new_id,
    payload_json,
)
from gateway.store.findings import FindingRecord, Measurement, ModelRun, RunFilter
from gateway.store.queue import LeaseLost, Queue
from tests.queues import BACKENDS, any_payload, open_test_queue, reopen_test_queue

QUIET = 5.0


@pytest.fixture(params=BACKENDS)
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    q = open_test_queue(request.param, tmp_path)
    yield q
    q.close()


def instance(
    sop: str, study: str = "study-1", at: float = 100.0, source: str = "PACS@127.0.0.1"
) -> Envelope:
    return Envelope(
        id=new_id(),
        kind=Kind.DICOM,
        source=source,
        received_at=at,
        dedup_key=f"dicom:{sop}",
        spool_key=f"spool-{sop}",
        study_key=study,
        size=10,
    )


def message(control_id: str, at: float = 100.0) -> Envelope:
    return Envelope(
        id=new_id(),
        kind=Kind.HL7,
        source="EHR/HOSP@127.0.0.1",
        received_at=at,
        dedup_key=f"hl7:{control_id}",
        size=20,
    )


def job_row(q: Queue, job_id: int) -> dict[str, object]:
    job = q.job(job_id)
    assert job is not None
    return {
        "state": job.state.value,
        "run_at": job.run_at,
        "last_error": job.last_error,
        "lease_token": job.lease_token,
        "worker": job.worker,
        "attempts": job.attempts,
    }


# --- leasing ------------------------------------------------------------------------------


def test_lease_returns_the_oldest_ready_job_of_the_requested_stages_only(
    queue: Queue,
) -> None:
    queue.enqueue(Stage.INFER, "a", 1.0, any_payload(Stage.INFER))
    route_new = queue.enqueue(Stage.ROUTE, "b", 3.0, any_payload(Stage.ROUTE))
    route_old = queue.enqueue(Stage.ROUTE, "c", 2.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.DELIVER, "d", 0.5, any_payload(Stage.DELIVER))

    first = queue.lease([Stage.ROUTE, Stage.BUILD], "w1", 30, now=10.0)
    second = queue.lease([Stage.ROUTE, Stage.BUILD], "w1", 30, now=10.0)
    third = queue.lease([Stage.ROUTE, Stage.BUILD], "w1", 30, now=10.0)

    assert first is not None and second is not None
    assert (first.id, first.subject, second.id, second.subject) == (route_old, "c", route_new, "b")
    assert third is None


def test_leased_job_carries_token_deadline_and_attempt_count(queue: Queue) -> None:
    queue.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE, 1))
    job = queue.lease([Stage.ROUTE], "w1", 30, now=10.0)
    assert job is not None
    assert job.state is JobState.LEASED
    assert job.attempts == 1
    assert job.lease_expires == 40.0
    assert job.lease_token is not None and re.fullmatch(r"[0-9a-f]{16}", job.lease_token)
    assert job.payload == any_payload(Stage.ROUTE, 1)
    assert job_row(queue, job.id)["worker"] == "w1"


def test_a_leased_job_is_not_leased_twice(queue: Queue) -> None:
    queue.enqueue(Stage.ROUTE, "s", 1.0, any_payload(Stage.ROUTE))
    assert queue.lease([Stage.ROUTE], "w1", 30, now=10.0) is not None
    assert queue.lease([Stage.ROUTE], "w2", 30, now=11.0) is None


def test_job_scheduled_in_the_future_is_not_leased_until_due(queue: Queue) -> None:
    job_id = queue.enqueue(Stage.DELIVER, "s", 100.0, any_payload(Stage.DELIVER))
    assert queue.lease([Stage.DELIVER], "w", 30, now=99.9) is None
    job = queue.lease([Stage.DELIVER], "w", 30, now=100.0)
    assert job is not None and job.id == job_id


def test_heartbeat_extends_the_lease_deadline(queue: Queue) -> None:
    queue.enqueue(Stage.INFER, "s", 1.0, any_payload(Stage.INFER))
    job = queue.lease([Stage.INFER], "w", 30, now=10.0)
    assert job is not None
    renewed = queue.heartbeat(job, 60, now=35.0)
    assert renewed.lease_expires == 95.0
    assert renewed.lease_token == job.lease_token
    assert queue.sweep_expired(now=50.0) == 0  # would have expired at 40 without the heartbeat


def test_complete_marks_the_job_done(queue: Queue) -> None:
    queue.enqueue(Stage.BUILD, "s", 1.0, any_payload(Stage.BUILD))
    job = queue.lease([Stage.BUILD], "w", 30, now=10.0)
    assert job is not None
    queue.complete(job, now=11.0)
    row = job_row(queue, job.id)
    assert (row["state"], row["lease_token"]) == ("done", None)
    assert queue.lease([Stage.BUILD], "w", 30, now=12.0) is None


def test_fail_records_the_error_and_returns_the_job_to_ready_at_retry_time(
    queue: Queue,
) -> None:
    queue.enqueue(Stage.DELIVER, "s", 1.0, any_payload(Stage.DELIVER))
    job = queue.lease([Stage.DELIVER], "w", 30, now=10.0)
    assert job is not None
    queue.fail(job, "peer refused", retry_at=70.0, now=11.0)

    row = job_row(queue, job.id)
    assert (row["state"], row["run_at"], row["last_error"], row["lease_token"]) == (
        "ready",
        70.0,
        "peer refused",
        None,
    )
    assert queue.lease([Stage.DELIVER], "w", 30, now=69.0) is None
    again = queue.lease([Stage.DELIVER], "w", 30, now=70.0)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert again.last_error == "peer refused"


def test_fail_truncates_a_huge_error_to_2000_characters(queue: Queue) -> None:
    queue.enqueue(Stage.DELIVER, "s", 1.0, any_payload(Stage.DELIVER))
    job = queue.lease([Stage.DELIVER], "w", 30, now=10.0)
    assert job is not None
    queue.fail(job, "x" * 5000, retry_at=20.0, now=11.0)
    assert job_row(queue, job.id)["last_error"] == "x" * 2000


def test_dead_job_is_listed_with_its_last_error(queue: Queue) -> None:
    job_id = queue.enqueue(Stage.DELIVER, "s", 1.0, any_payload(Stage.DELIVER))
    job = queue.lease([Stage.DELIVER], "w", 30, now=10.0)
    assert job is not None
    queue.dead(job, "AR: unknown patient", now=11.0)
    dead = queue.dead_jobs()
    assert [(j.id, j.state, j.last_error, j.attempts) for j in dead] == [
        (job_id, JobState.DEAD, "AR: unknown patient", 1)
    ]


# --- stale lease tokens -------------------------------------------------------------------


@pytest.mark.parametrize("action", ["complete", "fail", "dead", "heartbeat"])
def test_transition_with_a_stale_lease_token_raises_lease_lost(queue: Queue, action: str) -> None:
    """A worker whose lease expired and was swept cannot overwrite the new holder."""
    queue.enqueue(Stage.INFER, "s", 1.0, any_payload(Stage.INFER))
    stale = queue.lease([Stage.INFER], "slow", 30, now=10.0)
    assert stale is not None
    assert queue.sweep_expired(now=41.0) == 1
    holder = queue.lease([Stage.INFER], "fast", 30, now=42.0)
    assert holder is not None and holder.id == stale.id
    assert holder.lease_token != stale.lease_token

    with pytest.raises(LeaseLost, match=rf"job {stale.id} \(infer\) is no longer leased"):
        if action == "complete":
            queue.complete(stale, now=43.0)
        elif action == "fail":
            queue.fail(stale, "late", retry_at=50.0, now=43.0)
        elif action == "dead":
            queue.dead(stale, "late", now=43.0)
        else:
            queue.heartbeat(stale, 30, now=43.0)

    row = job_row(queue, holder.id)
    assert (row["state"], row["lease_token"], row["worker"]) == (
        "leased",
        holder.lease_token,
        "fast",
    )
    queue.complete(holder, now=44.0)  # the new holder still owns it
    assert job_row(queue, holder.id)["state"] == "done"


def test_completing_an_already_completed_job_raises_lease_lost(queue: Queue) -> None:
    queue.enqueue(Stage.INFER, "s", 1.0, any_payload(Stage.INFER))
    job = queue.lease([Stage.INFER], "w", 30, now=10.0)
    assert job is not None
    queue.complete(job, now=11.0)
    with pytest.raises(LeaseLost):
        queue.complete(job, now=12.0)


def test_sweep_expired_returns_only_expired_leases_to_ready(queue: Queue) -> None:
    queue.enqueue(Stage.INFER, "short", 1.0, any_payload(Stage.INFER))
    queue.enqueue(Stage.INFER, "long", 2.0, any_payload(Stage.INFER))
    short = queue.lease([Stage.INFER], "w", 10, now=10.0)
    long = queue.lease([Stage.INFER], "w", 100, now=10.0)
    assert short is not None and long is not None

    assert queue.sweep_expired(now=20.0) == 0  # deadline is exclusive: expires *after* 20
    assert queue.sweep_expired(now=21.0) == 1
    swept = job_row(queue, short.id)
    assert (swept["state"], swept["lease_token"], swept["last_error"]) == (
        "ready",
        None,
        "lease expired",
    )
    assert job_row(queue, long.id)["state"] == "leased"


def test_sweep_keeps_an_earlier_error_message(queue: Queue) -> None:
    queue.enqueue(Stage.INFER, "s", 1.0, any_payload(Stage.INFER))
    job = queue.lease([Stage.INFER], "w", 10, now=10.0)
    assert job is not None
    queue.fail(job, "GPU out of memory", retry_at=11.0, now=11.0)
    job = queue.lease([Stage.INFER], "w", 10, now=12.0)
    assert job is not None
    assert queue.sweep_expired(now=30.0) == 1
    assert job_row(queue, job.id)["last_error"] == "GPU out of memory"


# --- replay -------------------------------------------------------------------------------


def _dead(queue: Queue, subject: str, now: float) -> int:
    job_id = queue.enqueue(Stage.DELIVER, subject, now, any_payload(Stage.DELIVER))
    job = queue.lease([Stage.DELIVER], "w", 30, now=now)
    assert job is not None and job.id == job_id
    queue.dead(job, f"gave up on {subject}", now=now)
    return job_id


def test_replay_none_returns_every_dead_job_to_ready_with_attempts_reset(
    queue: Queue,
) -> None:
    a, b = _dead(queue, "a", 1.0), _dead(queue, "b", 2.0)
    assert queue.replay(None, now=50.0) == 2
    assert queue.dead_jobs() == []
    for job_id in (a, b):
        row = job_row(queue, job_id)
        assert (row["state"], row["attempts"], row["run_at"]) == ("ready", 0, 50.0)


def test_replay_of_listed_ids_touches_only_those_dead_jobs(queue: Queue) -> None:
    a, b = _dead(queue, "a", 1.0), _dead(queue, "b", 2.0)
    ready = queue.enqueue(Stage.DELIVER, "c", 3.0, any_payload(Stage.DELIVER))
    assert queue.replay([b, ready, 999], now=50.0) == 1
    assert job_row(queue, b)["state"] == "ready"
    assert [j.id for j in queue.dead_jobs()] == [a]
    assert job_row(queue, ready)["run_at"] == 3.0  # a ready job is not a dead letter


def test_replay_with_no_dead_jobs_returns_zero(queue: Queue) -> None:
    assert queue.replay(None, now=1.0) == 0
    assert queue.replay([1, 2], now=1.0) == 0


# --- one ready job per (stage, subject) ---------------------------------------------------


def test_enqueue_of_a_ready_stage_and_subject_keeps_one_job_with_the_new_payload(
    queue: Queue,
) -> None:
    first = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE, 1))
    second = queue.enqueue(Stage.ROUTE, "study", 2.0, any_payload(Stage.ROUTE, 2))
    other_stage = queue.enqueue(Stage.INFER, "study", 2.0, any_payload(Stage.INFER))
    assert second == first
    assert other_stage != first
    assert queue.counts()["jobs:route"] == {"ready": 1}
    job = queue.lease([Stage.ROUTE], "w", 30, now=10.0)
    assert job is not None and job.payload == any_payload(Stage.ROUTE, 2)


def test_enqueue_while_the_same_subject_is_leased_adds_a_second_job(queue: Queue) -> None:
    first = queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE, 1))
    assert queue.lease([Stage.ROUTE], "w", 30, now=10.0) is not None
    second = queue.enqueue(Stage.ROUTE, "study", 11.0, any_payload(Stage.ROUTE, 2))
    assert second != first
    assert queue.counts()["jobs:route"] == {"leased": 1, "ready": 1}


def test_failing_a_job_whose_subject_was_requeued_meanwhile_keeps_one_ready_job(
    queue: Queue,
) -> None:
    queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE, 1))
    job = queue.lease([Stage.ROUTE], "w", 30, now=10.0)
    assert job is not None
    queue.enqueue(Stage.ROUTE, "study", 11.0, any_payload(Stage.ROUTE, 2))  # reopened, completed
    queue.fail(job, "router crashed", retry_at=20.0, now=12.0)
    assert queue.counts()["jobs:route"] == {"ready": 1, "done": 1}
    assert job_row(queue, job.id)["last_error"].startswith("superseded")


def test_sweep_recovers_other_expired_leases_when_one_subject_was_requeued(
    queue: Queue,
) -> None:
    queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.INFER, "other", 1.0, any_payload(Stage.INFER))
    assert queue.lease([Stage.ROUTE], "w", 30, now=10.0) is not None
    other = queue.lease([Stage.INFER], "w", 30, now=10.0)
    assert other is not None
    queue.enqueue(Stage.ROUTE, "study", 11.0, any_payload(Stage.ROUTE))
    assert queue.sweep_expired(now=100.0) == 2  # one back to ready, one superseded
    assert job_row(queue, other.id)["state"] == "ready"
    assert queue.counts()["jobs:route"] == {"ready": 1, "done": 1}


def test_replay_of_a_dead_job_whose_subject_is_waiting_again_does_not_crash(
    queue: Queue,
) -> None:
    _dead(queue, "study", 1.0)
    queue.enqueue(Stage.DELIVER, "study", 2.0, any_payload(Stage.DELIVER))
    assert queue.replay(None, now=3.0) == 0  # the waiting job does the work
    assert queue.counts()["jobs:deliver"] == {"ready": 1, "done": 1}


# --- ingest -------------------------------------------------------------------------------


def test_record_instance_dedups_by_dedup_key(queue: Queue) -> None:
    first = instance("1.2.3", at=100.0)
    ack1 = queue.record_instance(first, b"attrs1", QUIET)
    ack2 = queue.record_instance(instance("1.2.3", at=101.0), b"attrs2", QUIET)
    assert (ack1.new, ack1.envelope_id) == (True, first.id)
    assert (ack2.new, ack2.envelope_id) == (False, first.id)
    assert queue.counts()["received"] == {"dicom": 1}
    study = queue.study("study-1")
    assert study is not None and study.instances == 1
    env, attrs, inline = queue.envelope(first.id)
    assert (env, attrs, inline) == (first, b"attrs1", None)
    assert queue.find("dicom:1.2.3") == first.id
    assert queue.find("dicom:9.9.9") is None


def test_a_small_instance_is_kept_in_its_row_and_a_resend_keeps_the_first(queue: Queue) -> None:
    first = replace(instance("1.2.4", at=100.0), spool_key=None)
    assert queue.record_instance(first, b"attrs", QUIET, b"sealed instance").new
    again = replace(instance("1.2.4", at=101.0), spool_key=None)
    assert not queue.record_instance(again, b"other", QUIET, b"other bytes").new
    assert queue.envelope(first.id) == (first, b"attrs", b"sealed instance")
    assert [e.id for e in queue.study_envelopes("study-1")] == [first.id]
    assert queue.referenced_spool_keys() == set()
    assert b"sealed instance"[:64] in set(queue.sealed_blobs())  # a key in use stays


def test_each_new_instance_restarts_the_study_quiet_period(queue: Queue) -> None:
    queue.record_instance(instance("1", at=100.0), b"", QUIET)
    queue.record_instance(instance("2", at=103.0), b"", QUIET)
    study = queue.study("study-1")
    assert study is not None
    assert (study.state, study.instances, study.last_at, study.complete_due) == (
        "open",
        2,
        103.0,
        108.0,
    )
    assert queue.next_study_due() == 108.0


def test_complete_due_studies_waits_for_the_quiet_period(queue: Queue) -> None:
    queue.record_instance(instance("1", "A", at=100.0), b"", QUIET)
    queue.record_instance(instance("2", "B", at=102.0), b"", QUIET)

    assert queue.complete_due_studies(now=104.9) == []
    assert queue.complete_due_studies(now=105.0) == ["A"]
    assert queue.complete_due_studies(now=106.0) == []
    assert queue.complete_due_studies(now=200.0) == ["B"]
    assert queue.complete_due_studies(now=300.0) == []

    job = queue.lease([Stage.ROUTE], "w", 30, now=300.0)
    assert job is not None
    assert (job.subject, job.payload) == (
        "A",
        RoutePayload(Kind.DICOM, 1, False),
    )
    assert queue.counts()["studies"] == {"complete": 2}
    assert queue.next_study_due() is None


def test_late_instance_reopens_a_complete_study_as_a_new_generation(
    queue: Queue,
) -> None:
    queue.record_instance(instance("1", at=100.0), b"", QUIET)
    assert queue.complete_due_studies(now=105.0) == ["study-1"]
    first = queue.lease([Stage.ROUTE], "w", 30, now=105.0)
    assert first is not None and first.payload == RoutePayload(Kind.DICOM, 1, False)
    queue.complete(first, now=106.0)

    late = instance("2", at=200.0)
    queue.record_instance(late, b"", QUIET)
    study = queue.study("study-1")
    assert study is not None
    assert (study.state, study.generation, study.reopened, study.instances) == (
        "open",
        2,
        True,
        2,
    )
    assert queue.envelope(late.id)[0].late

    assert queue.complete_due_studies(now=204.0) == []
    assert queue.complete_due_studies(now=205.0) == ["study-1"]
    second = queue.lease([Stage.ROUTE], "w", 30, now=205.0)
    assert second is not None
    assert second.payload == RoutePayload(Kind.DICOM, 2, True)


def test_instance_into_an_open_study_is_not_marked_late(queue: Queue) -> None:
    queue.record_instance(instance("1", at=100.0), b"", QUIET)
    env = instance("2", at=101.0)
    queue.record_instance(env, b"", QUIET)
    study = queue.study("study-1")
    assert study is not None and (study.generation, study.reopened) == (1, False)
    assert not queue.envelope(env.id)[0].late


def test_study_completed_twice_before_routing_is_routed_once_with_the_latest_generation(
    queue: Queue,
) -> None:
    queue.record_instance(instance("1", at=100.0), b"", QUIET)
    queue.complete_due_studies(now=105.0)
    queue.record_instance(instance("2", at=106.0), b"", QUIET)
    queue.complete_due_studies(now=111.0)
    assert queue.counts()["jobs:route"] == {"ready": 1}
    job = queue.lease([Stage.ROUTE], "w", 30, now=112.0)
    assert job is not None and job.payload == RoutePayload(Kind.DICOM, 2, True)


def test_record_message_queues_it_for_routing_and_returns_the_ack(queue: Queue) -> None:
    env = message("CTRL1")
    ack = queue.record_message(env, b"sealed-msg", b"sealed-attrs", b"MSH|ACK-1")
    assert (ack.new, ack.envelope_id, ack.ack) == (True, env.id, b"MSH|ACK-1")
    stored, attrs, inline = queue.envelope(env.id)
    assert (stored, attrs, inline) == (env, b"sealed-attrs", b"sealed-msg")
    job = queue.lease([Stage.ROUTE], "w", 30, now=100.0)
    assert job is not None and job.subject == env.id


def test_resent_message_gets_the_stored_ack_and_stores_nothing(queue: Queue) -> None:
    original = message("CTRL1", at=100.0)
    queue.record_message(original, b"m1", b"a1", b"ACK-ORIGINAL")
    resend = message("CTRL1", at=160.0)
    ack = queue.record_message(resend, b"m2", b"a2", b"ACK-NEW")
    assert (ack.new, ack.envelope_id, ack.ack) == (False, original.id, b"ACK-ORIGINAL")
    assert queue.counts()["received"] == {"hl7": 1}
    assert queue.counts()["jobs:route"] == {"ready": 1}
    with pytest.raises(KeyError):
        queue.envelope(resend.id)


def test_envelopes_lists_by_kind_in_arrival_order(queue: Queue) -> None:
    late, early = instance("1", at=200.0), instance("2", at=100.0)
    msg = message("C", at=150.0)
    queue.record_instance(late, b"", QUIET)
    queue.record_instance(early, b"", QUIET)
    queue.record_message(msg, b"", b"", b"")
    assert [e.id for e in queue.envelopes()] == [early.id, msg.id, late.id]
    assert [e.id for e in queue.envelopes(Kind.DICOM)] == [early.id, late.id]
    assert [e.id for e in queue.envelopes(Kind.HL7)] == [msg.id]


# --- reading ------------------------------------------------------------------------------


def test_counts_report_received_studies_and_jobs_by_stage_and_state(
    queue: Queue,
) -> None:
    assert queue.counts() == {"received": {}, "studies": {}}
    queue.record_instance(instance("1", "A", at=100.0), b"", QUIET)
    queue.record_instance(instance("2", "B", at=100.0), b"", QUIET)
    queue.record_message(message("C", at=100.0), b"", b"", b"")
    queue.complete_due_studies(now=105.0)  # A and B complete: two more route jobs
    queue.record_instance(instance("3", "C", at=110.0), b"", QUIET)
    queue.enqueue(Stage.DELIVER, "x", 1.0, any_payload(Stage.DELIVER))
    leased = queue.lease([Stage.DELIVER], "w", 30, now=110.0)
    assert leased is not None
    _dead(queue, "y", 111.0)

    assert queue.counts() == {
        "received": {"dicom": 3, "hl7": 1},
        "studies": {"complete": 2, "open": 1},
        "jobs:route": {"ready": 3},
        "jobs:deliver": {"leased": 1, "dead": 1},
    }


def test_oldest_ready_age_counts_ready_and_leased_jobs_only(queue: Queue) -> None:
    assert queue.oldest_ready_age(now=100.0) is None
    queue.enqueue(Stage.ROUTE, "a", 10.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.ROUTE, "b", 40.0, any_payload(Stage.ROUTE))
    assert queue.oldest_ready_age(now=100.0) == 90.0
    job = queue.lease([Stage.ROUTE], "w", 30, now=50.0)
    assert job is not None and job.subject == "a"
    assert queue.oldest_ready_age(now=100.0) == 90.0
    queue.complete(job, now=51.0)
    assert queue.oldest_ready_age(now=100.0) == 60.0


def test_job_groups_count_jobs_by_stage_lane_and_state_with_retries_and_ages(
    queue: Queue,
) -> None:
    assert queue.job_groups() == []
    queue.enqueue(Stage.ROUTE, "a", 10.0, any_payload(Stage.ROUTE))
    queue.enqueue(Stage.DELIVER, "pacs|a", 20.0, any_payload(Stage.DELIVER), lane="pacs")
    queue.enqueue(Stage.DELIVER, "pacs|b", 30.0, any_payload(Stage.DELIVER), lane="pacs")
    done = queue.lease([Stage.DELIVER], "w", 30, now=40.0, lane="pacs")
    assert done is not None and done.subject == "pacs|a"
    queue.complete(done, now=41.0)
    failed = queue.lease([Stage.DELIVER], "w", 30, now=42.0, lane="pacs")
    assert failed is not None
    queue.fail(failed, "refused", retry_at=60.0, now=43.0)

    groups = {(g.stage, g.lane, g.state): g for g in queue.job_groups()}
    assert set(groups) == {
        ("route", "", "ready"),
        ("deliver", "pacs", "done"),
        ("deliver", "pacs", "ready"),
    }
    delivered = groups["deliver", "pacs", "done"]
    assert (delivered.jobs, delivered.newest_updated) == (1, 41.0)
    waiting = groups["deliver", "pacs", "ready"]
    assert (waiting.jobs, waiting.retried, waiting.oldest_created) == (1, 1, 30.0)
    assert groups["route", "", "ready"].retried == 0


def test_study_timelines_list_the_newest_studies_with_their_jobs_by_stage(
    queue: Queue,
) -> None:
    assert queue.study_timelines(10) == []
    queue.record_instance(instance("1", "A", at=100.0), b"", QUIET)
    queue.record_instance(instance("2", "A", at=101.0), b"", QUIET)
    queue.record_instance(instance("3", "B", at=102.0), b"", QUIET)
    assert queue.complete_due_studies(now=106.5) == ["A"]
    route = queue.lease([Stage.ROUTE], "w", 30, now=107.0)
    assert route is not None and route.subject == "A"
    queue.complete(
        route,
        now=108.0,
        then=[
            NextJob(Stage.INFER, "m|A", any_payload(Stage.INFER)),
            NextJob(Stage.DELIVER, "pacs|A", any_payload(Stage.DELIVER), lane="pacs"),
        ],
    )
    infer = queue.lease([Stage.INFER], "w", 30, now=109.0)
    assert infer is not None
    queue.complete(infer, now=110.0)
    deliver = queue.lease([Stage.DELIVER], "w", 30, now=111.0, lane="pacs")
    assert deliver is not None
    queue.dead(deliver, "refused", now=112.0)

    b, a = queue.study_timelines(10)
    assert (b.study_key, b.state, b.instances, b.complete_at) == ("B", "open", 1, None)
    assert all(m.jobs == 0 for m in b.stages.values())
    assert (a.study_key, a.state, a.instances, a.received_at) == ("A", "complete", 2, 100.0)
    assert a.complete_at == 106.5
    assert a.stages["route"].finished and a.stages["route"].done_at == 108.0
    assert a.stages["infer"].finished and a.stages["infer"].done_at == 110.0
    assert a.stages["build"].jobs == 0
    assert (a.stages["deliver"].jobs, a.stages["deliver"].dead) == (1, 1)
    assert not a.stages["deliver"].finished and a.stages["deliver"].done_at is None
    assert [t.study_key for t in queue.study_timelines(1)] == ["B"]


def test_complete_enqueues_the_next_jobs_in_the_same_transaction(queue: Queue) -> None:
    queue.enqueue(Stage.ROUTE, "study", 1.0, any_payload(Stage.ROUTE))
    job = queue.lease([Stage.ROUTE], "w", 30, now=2.0)
    assert job is not None
    queue.complete(
        job,
        now=3.0,
        then=[
            NextJob(Stage.DELIVER, "pacs|study", any_payload(Stage.DELIVER), lane="pacs"),
            NextJob(Stage.DELIVER, "ehr|study", any_payload(Stage.DELIVER), lane="ehr"),
        ],
    )
    assert queue.lease([Stage.DELIVER], "w", 30, now=4.0, lane="ehr").subject == "ehr|study"  # type: ignore[union-attr]
    assert queue.lease([Stage.DELIVER], "w", 30, now=4.0, lane="ehr") is None
    assert queue.counts()["jobs:deliver"] == {"leased": 1, "ready": 1}


def test_first_failure_time_is_kept_across_retries(queue: Queue) -> None:
    queue.enqueue(Stage.DELIVER, "pacs|s", 1.0, any_payload(Stage.DELIVER), lane="pacs")
    for now in (2.0, 20.0):
        job = queue.lease([Stage.DELIVER], "w", 30, now=now, lane="pacs")
        assert job is not None
        queue.fail(job, "peer down", retry_at=now + 1, now=now)
    job = queue.lease([Stage.DELIVER], "w", 30, now=40.0, lane="pacs")
    assert job is not None and job.first_failed_at == 2.0 and job.attempts == 3


# --- typed payloads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, sent",
    [
        (Stage.ROUTE, RoutePayload(Kind.HL7)),
        (Stage.ROUTE, RoutePayload(Kind.DICOM, 3, True)),
        (Stage.INFER, InferPayload("lung", Kind.DICOM, "study", ("pacs", "ehr"), "chest-ct")),
        (
            Stage.BUILD,
            BuildPayload("lung", Kind.DICOM, "study", "r-key", ("pacs",), "ct", "m-key", "x-key"),
        ),
        (Stage.DELIVER, DeliverPayload("ehr", Kind.HL7, "lung|msg", "result", ("o1", "o2"), "1.2")),
        (Stage.DELIVER, DeliverPayload("pacs", Kind.DICOM, "study", "forward")),
    ],
)
def test_a_payload_comes_back_as_the_record_it_went_in_as(
    queue: Queue, stage: Stage, sent: Payload
) -> None:
    job_id = queue.enqueue(stage, "s", 1.0, sent)
    job = queue.lease([stage], "w", 30, now=2.0)
    assert job is not None and job.id == job_id
    assert job.payload == sent and type(job.payload) is type(sent)
    stored = queue.job(job_id)
    assert stored is not None and stored.payload == sent


@pytest.mark.parametrize(
    "sent",
    [
        RoutePayload(Kind.HL7),
        RoutePayload(None, 3, True),
        InferPayload("lung", Kind.DICOM, "study", ("pacs", "ehr"), "chest-ct"),
        BuildPayload("lung", Kind.DICOM, "study", "r-key", ("pacs",), "ct", "m-key", "x-key"),
        DeliverPayload("ehr", Kind.HL7, "lung|msg", "result", ("o1", "o2"), "1.2"),
    ],
)
def test_a_payload_is_stored_as_the_json_of_its_fields(sent: Payload) -> None:
    """The stored text is what ``dataclasses.asdict`` gives (rows written by earlier
    versions and by these read alike)."""
    assert payload_json(sent) == json.dumps(dataclasses.asdict(sent), sort_keys=True)


def test_a_next_job_takes_only_the_record_of_its_stage() -> None:
    with pytest.raises(TypeError, match="a deliver job takes a DeliverPayload"):
        NextJob(Stage.DELIVER, "s", RoutePayload(Kind.DICOM))


def test_an_unknown_job_id_is_none(queue: Queue) -> None:
    assert queue.job(12345) is None


# --- coordination -------------------------------------------------------------------------


def test_one_holder_at_a_time_of_a_site_wide_lock(queue: Queue) -> None:
    """Another process or node (here: another connection to the same database) finds the
    lock held and skips; once released, it can take it; other names are independent."""
    other = reopen_test_queue(queue)
    try:
        with queue.exclusive("retention") as mine:
            assert mine
            with other.exclusive("retention") as theirs:
                assert not theirs
            with other.exclusive("something-else") as unrelated:
                assert unrelated
        with other.exclusive("retention") as theirs:
            assert theirs
    finally:
        other.close()


def test_a_lane_that_takes_one_delivery_at_a_time_leases_one_job_site_wide(
    queue: Queue,
) -> None:
    """*alone*: while a job of the lane is leased (here by another node's connection), no
    other job of the lane is leased; other lanes go on; once it is done, the next goes."""
    other = reopen_test_queue(queue)
    try:
        first = queue.enqueue(Stage.DELIVER, "ehr|a", 1.0, any_payload(Stage.DELIVER), lane="ehr")
        second = queue.enqueue(Stage.DELIVER, "ehr|b", 1.0, any_payload(Stage.DELIVER), lane="ehr")
        queue.enqueue(Stage.DELIVER, "pacs|a", 1.0, any_payload(Stage.DELIVER), lane="pacs")
        held = other.lease([Stage.DELIVER], "node-b", 30, now=2.0, lane="ehr", alone=True)
        assert held is not None and held.id == first
        assert queue.lease([Stage.DELIVER], "node-a", 30, now=2.0, lane="ehr", alone=True) is None
        pacs = queue.lease([Stage.DELIVER], "node-a", 30, now=2.0, lane="pacs", alone=True)
        assert pacs is not None and pacs.subject == "pacs|a"
        # without *alone* a lane is not exclusive (the default: one worker per process)
        free = queue.lease([Stage.DELIVER], "node-a", 30, now=2.0, lane="ehr")
        assert free is not None and free.id == second
        queue.fail(free, "put back", retry_at=2.0, now=2.0)
        other.complete(held, now=3.0)
        nxt = queue.lease([Stage.DELIVER], "node-a", 30, now=4.0, lane="ehr", alone=True)
        assert nxt is not None and nxt.id == second
    finally:
        other.close()


def test_two_nodes_racing_for_a_one_at_a_time_lane_never_both_win(queue: Queue) -> None:
    """Several connections lease in the same lane at once, many times: at no moment are two
    jobs of the lane leased."""
    others = [reopen_test_queue(queue) for _ in range(3)]
    try:
        for i in range(12):
            queue.enqueue(Stage.DELIVER, f"ehr|{i}", 1.0, any_payload(Stage.DELIVER), lane="ehr")
        barrier = threading.Barrier(len(others))
        won: list[list[int]] = [[] for _ in others]

        def race(k: int, q: Queue) -> None:
            for _ in range(4):
                barrier.wait(timeout=10)
                job = q.lease([Stage.DELIVER], f"node-{k}", 30, now=2.0, lane="ehr", alone=True)
                barrier.wait(timeout=10)
                if job is not None:
                    won[k].append(job.id)
                    q.complete(job, now=3.0)

        threads = [threading.Thread(target=race, args=(k, q)) for k, q in enumerate(others)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(len(w) for w in won) == 4  # exactly one winner per round
    finally:
        for q in others:
            q.close()


# --- retention ----------------------------------------------------------------------------


def _run_all(queue: Queue, now: float) -> None:
    while (job := queue.lease(list(Stage), "w", 30, now=now)) is not None:
        queue.complete(job, now=now)


def test_purge_deletes_old_finished_work_with_its_spool_keys_and_keeps_what_is_busy(
    queue: Queue,
) -> None:
    """The same retention plan on every engine: a done study and a done message go, with
    the spool keys of their envelopes and of their jobs' payloads; a study with a job
    still waiting stays; a dry run deletes nothing and reports the same."""
    result_key = "1700000000-" + "a" * 32
    queue.record_instance(instance("1", study="old"), b"attrs-old", QUIET)
    queue.record_instance(instance("2", study="busy"), b"attrs-busy", QUIET)
    msg = message("M1")
    queue.record_message(msg, b"sealed", b"attrs", b"ACK")
    queue.complete_due_studies(now=200.0)
    _run_all(queue, now=201.0)
    build = BuildPayload("m", Kind.DICOM, "old", result=result_key)
    queue.enqueue(Stage.BUILD, "m|old", 202.0, build)
    _run_all(queue, now=202.0)
    queue.enqueue(Stage.DELIVER, "pacs|busy", 9999.0, any_payload(Stage.DELIVER))

    dry = queue.purge_rows(1000.0, dry_run=True)
    assert (dry.studies, dry.messages, dry.kept) == (["old"], [msg.id], 1)
    assert set(dry.spool_keys) == {"spool-1", result_key}
    assert [attrs for _, attrs in dry.study_attrs] == [b"attrs-old"]
    assert queue.study("old") is not None  # nothing deleted
    done = queue.purge_rows(1000.0)
    assert (done.studies, done.messages, done.kept, done.envelopes) == (["old"], [msg.id], 1, 2)
    assert set(done.spool_keys) == {"spool-1", result_key}
    assert [attrs for _, attrs in done.study_attrs] == [b"attrs-old"]
    assert queue.study("old") is None and queue.find("hl7:M1") is None
    assert queue.study("busy") is not None and queue.find("dicom:2") is not None


# --- the findings store -----------------------------------------------------------------


def _run(
    run_id: str,
    *,
    model: str = "lung-nodules",
    version: str = "0.2.0",
    subject: str = "study-1",
    at: float = 1_000.0,
    findings: tuple[FindingRecord, ...] = (),
) -> ModelRun:
    return ModelRun(
        id=run_id,
        kind="dicom",
        subject=subject,
        study_key=subject,
        accession_ref="acc-ref",
        modality="CT",
        body_part="CHEST",
        model=model,
        model_version=version,
        weights_sha256="ab" * 32,
        route="chest-ct",
        report_status="",
        received_at=at - 60,
        complete_at=at - 30,
        inferred_at=at,
        concepts=("lung-nodule",),
        findings=findings,
    )


NODULE = FindingRecord(
    finding="lung nodule",
    concept="lung-nodule",
    code_scheme="SCT",
    code_value="786838002",
    code_meaning="Nodule of lung",
    status="present",
    probability=0.91,
    measurements=(Measurement("diameter_mm", 8.5, "mm"), Measurement("volume_mm3", 321.0, "mm3")),
)


def _infer_job(queue: Queue, subject: str = "study-1") -> Job:
    queue.enqueue(Stage.INFER, f"lung-nodules|{subject}", 1.0, any_payload(Stage.INFER))
    job = queue.lease([Stage.INFER], "w", 30, now=10.0)
    assert job is not None
    return job


def test_a_model_run_is_stored_with_the_completion_of_its_job(queue: Queue) -> None:
    run = _run("r1", findings=(NODULE, replace(NODULE, probability=0.4, measurements=())))
    queue.complete(_infer_job(queue), now=11.0, run=run)
    (stored,) = queue.findings_runs(RunFilter())
    assert stored == run
    assert stored.positive


def test_a_run_is_not_stored_when_its_job_was_lost(queue: Queue) -> None:
    job = _infer_job(queue)
    queue.sweep_expired(now=100.0)  # the lease expired: another worker may take the job
    taken = queue.lease([Stage.INFER], "w2", 30, now=101.0)
    assert taken is not None
    with pytest.raises(LeaseLost):
        queue.complete(job, now=102.0, run=_run("r1", findings=(NODULE,)))
    assert queue.findings_runs(RunFilter()) == []


def test_findings_filters_select_runs_by_model_version_finding_and_time(queue: Queue) -> None:
    absent = replace(NODULE, status="absent", probability=None)
    runs = [
        _run("a", at=1_000.0, findings=(NODULE,)),
        _run("b", at=2_000.0, version="0.3.0", subject="study-2"),
        _run("c", at=3_000.0, model="other", subject="study-3", findings=(absent,)),
    ]
    for run in runs:
        queue.complete(_infer_job(queue, run.subject), now=11.0, run=run)

    def ids(**kw: object) -> list[str]:
        return [r.id for r in queue.findings_runs(RunFilter(**kw))]  # type: ignore[arg-type]

    assert ids() == ["a", "b", "c"]
    assert ids(model="lung-nodules") == ["a", "b"]
    assert ids(model="lung-nodules", version="0.3.0") == ["b"]
    assert ids(code="786838002") == ["a", "c"]
    assert ids(code="lung-nodule", status="present") == ["a"]
    assert ids(status="absent") == ["c"]
    assert ids(since=2_000.0) == ["b", "c"]
    assert ids(until=2_000.0) == ["a"]
    assert ids(modality="MR") == []


def test_a_delivery_marks_the_newest_run_of_its_subject_once(queue: Queue) -> None:
    queue.complete(_infer_job(queue), now=11.0, run=_run("old", at=1_000.0))
    queue.complete(_infer_job(queue), now=12.0, run=_run("new", at=2_000.0))
    for now in (2_100.0, 2_200.0):  # a second destination's delivery keeps the first time
        queue.enqueue(
            Stage.DELIVER, f"pacs|lung-nodules|study-1|{now}", 1.0, any_payload(Stage.DELIVER)
        )
        job = queue.lease([Stage.DELIVER], "w", 30, now=10.0)
        assert job is not None
        queue.complete(job, now=now, delivered=("lung-nodules", "study-1"))
    delivered = {r.id: r.delivered_at for r in queue.findings_runs(RunFilter())}
    assert delivered == {"old": None, "new": 2_100.0}


def test_findings_are_purged_by_their_own_cutoff(queue: Queue) -> None:
    for run_id, at in (("a", 1_000.0), ("b", 2_000.0), ("c", 3_000.0)):
        queue.complete(
            _infer_job(queue, run_id),
            now=11.0,
            run=_run(run_id, subject=run_id, at=at, findings=(NODULE,)),
        )
    assert queue.purge_findings(2_500.0, dry_run=True) == 2
    assert len(queue.findings_runs(RunFilter())) == 3
    assert queue.purge_findings(2_500.0) == 2
    assert [r.id for r in queue.findings_runs(RunFilter())] == ["c"]
    assert queue.findings_runs(RunFilter(code="lung-nodule"))[0].findings == (NODULE,)


def test_the_findings_mark_changes_when_a_run_is_added_or_purged(queue: Queue) -> None:
    assert queue.findings_mark(0.0) == (0, None, None)
    for run_id, at in (("a", 1_000.0), ("b", 2_000.0)):
        queue.complete(_infer_job(queue, run_id), now=11.0, run=_run(run_id, subject=run_id, at=at))
    assert queue.findings_mark(0.0) == (2, 1_000.0, 2_000.0)
    assert queue.findings_mark(1_500.0) == (1, 2_000.0, 2_000.0)  # the window's runs only
    before = queue.findings_mark(0.0)
    queue.complete(_infer_job(queue, "c"), now=12.0, run=_run("c", subject="c", at=3_000.0))
    added = queue.findings_mark(0.0)
    queue.purge_findings(1_500.0)
    assert len({before, added, queue.findings_mark(0.0)}) == 3


def test_a_job_id_beyond_64_bits_names_no_job_and_replays_nothing(queue: Queue) -> None:
    """Such an id cannot be bound by either engine (SQLite raised OverflowError): an id
    from outside (the dashboard's URL, the command line) that no job can have."""
    assert queue.job(2**70) is None
    assert queue.replay([2**70], now=1.0) == 0
    assert queue.job(0) is None
