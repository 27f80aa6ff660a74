"""The dashboard's pure parts: the tokens file (``gateway/dashboard/auth.py``) and what
each view shows (``gateway/dashboard/views.py``), from plain values."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import cast

import pytest

from gateway.dashboard import views
from gateway.dashboard.auth import Tokens, read_tokens
from gateway.dashboard.web import FindingsFigures
from gateway.envelope import Job, JobState, Stage
from gateway.errors import ConfigError
from gateway.store.findings import FindingRecord, ModelRun, RunFilter
from gateway.store.queue import JobGroup, Queue, StageMark, StudyTimeline
from gateway.store.sqlite import SQLiteQueue
from tests.queues import any_payload

TOKEN = "a-long-enough-token-0001"
OTHER = "another-long-token-0002"


def tokens_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


def test_a_token_is_known_in_clear_or_by_its_sha256_with_its_name_and_role(
    tmp_path: Path,
) -> None:
    digest = hashlib.sha256(OTHER.encode()).hexdigest()
    tokens = Tokens(
        tokens_file(
            tmp_path,
            f"tokens:\n  - {{name: screen, role: viewer, token: {TOKEN}}}\n"
            f"  - {{name: alice, role: operator, sha256: {digest}}}\n",
        )
    )
    screen, alice = tokens.by_token(TOKEN), tokens.by_token(OTHER)
    assert screen is not None and (screen.name, screen.role, screen.operator) == (
        "screen",
        "viewer",
        False,
    )
    assert alice is not None and (alice.name, alice.operator, alice.via) == ("alice", True, "token")
    assert tokens.by_token("a-long-enough-token-0003") is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tokens: [{name: a, role: viewer}]", "either 'sha256'"),
        (f"tokens: [{{name: a, role: viewer, token: {TOKEN}, sha256: '{'0' * 64}'}}]", "either"),
        ("tokens: [{name: a, role: viewer, token: short}]", "at least 16 characters"),
        (f"tokens: [{{name: a, role: admin, token: {TOKEN}}}]", "'viewer' or 'operator'"),
        ("tokens: [{name: a, role: viewer, sha256: abc}]", "should match pattern"),
        (f"tokens: [{{name: a, role: viewer, token: {TOKEN}, extra: 1}}]", "Extra inputs"),
        ("certificates: [{subject: 'XX=1', name: a, role: viewer}]", "is not one of"),
        ("tokens: [unclosed", "cannot read"),
    ],
)
def test_a_bad_tokens_file_is_a_config_error_naming_the_file_and_the_problem(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tokens_file(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as exc:
        read_tokens(path)
    assert str(path) in str(exc.value) and says in str(exc.value)


def test_a_client_certificate_matches_the_first_entry_whose_attributes_it_carries(
    tmp_path: Path,
) -> None:
    tokens = Tokens(
        tokens_file(
            tmp_path,
            "certificates:\n"
            "  - {subject: 'CN=alice,O=Elsewhere', name: wrong, role: operator}\n"
            "  - {subject: alice, name: alice, role: operator}\n",
        )
    )
    who = tokens.by_certificate(frozenset({("CN", "alice"), ("O", "General Hospital")}))
    assert who is not None and (who.name, who.via) == ("alice", "certificate")
    assert who.cert_subject == "CN=alice,O=General Hospital"
    assert tokens.by_certificate(frozenset({("CN", "bob")})) is None


def test_a_changed_tokens_file_is_read_again_and_a_broken_one_keeps_the_last_good(
    tmp_path: Path,
) -> None:
    path = tokens_file(tmp_path, f"tokens: [{{name: a, role: viewer, token: {TOKEN}}}]\n")
    tokens = Tokens(path)
    path.write_text(f"tokens: [{{name: b, role: viewer, token: {OTHER}}}]\n")
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's grain
    assert tokens.by_token(TOKEN) is None
    assert tokens.by_token(OTHER) is not None
    path.write_text("tokens: [{name: broken}]\n")
    os.utime(path, ns=(2, 2))
    assert tokens.by_token(OTHER) is not None  # the last good file still holds
    assert tokens.reload() is False


# --- views ------------------------------------------------------------------------------


def timeline(**stages: StageMark) -> StudyTimeline:
    return StudyTimeline("k" * 64, "complete", 3, 1, 100.0, 102.0, stages)


def states(row: views.StudyRow) -> dict[str, str]:
    return {s.step: s.state for s in row.steps}


def test_a_study_timeline_gives_each_step_its_time_since_the_step_before() -> None:
    row = views.study_row(
        timeline(
            route=StageMark(1, 1, 0, 102.5),
            infer=StageMark(1, 1, 0, 110.0),
            build=StageMark(1, 1, 0, 110.25),
            deliver=StageMark(2, 2, 0, 111.0),
        )
    )
    assert row.study == "k" * 12
    assert set(states(row).values()) == {"done"}
    assert [s.seconds for s in row.steps] == [None, 2.0, 0.5, 7.5, 0.25, 0.75]
    assert row.total_seconds == 11.0


def test_a_study_that_only_forwards_skips_inference_and_building() -> None:
    row = views.study_row(
        timeline(route=StageMark(1, 1, 0, 103.0), deliver=StageMark(1, 1, 0, 104.0))
    )
    assert states(row) == {
        "received": "done",
        "complete": "done",
        "routed": "done",
        "inferred": "skipped",
        "results built": "skipped",
        "delivered": "done",
    }
    assert row.steps[-1].seconds == 1.0


def test_a_dead_or_unfinished_stage_stops_the_timeline_there() -> None:
    row = views.study_row(timeline(route=StageMark(1, 1, 0, 103.0), infer=StageMark(1, 0, 1, None)))
    assert [states(row)[s] for s in ("inferred", "results built", "delivered")] == [
        "dead",
        "waiting",
        "waiting",
    ]
    waiting = views.study_row(timeline(route=StageMark(1, 0, 0, None)))
    assert states(waiting)["routed"] == "waiting" and states(waiting)["delivered"] == "waiting"


def test_queue_depth_and_destination_health_come_from_the_job_groups() -> None:
    groups = [
        JobGroup("deliver", "pacs", "done", 5, 1, 10.0, 90.0),
        JobGroup("deliver", "pacs", "ready", 2, 1, 40.0, 80.0),
        JobGroup("deliver", "pacs", "leased", 1, 0, 50.0, 95.0),
        JobGroup("deliver", "pacs", "dead", 1, 1, 20.0, 30.0),
        JobGroup("route", "", "ready", 3, 0, 70.0, 70.0),
    ]
    queue = views.queue_view({"received": {"dicom": 9}}, groups, now=100.0)
    (pacs, route) = queue.depth
    assert (pacs.stage, pacs.ready, pacs.leased, pacs.dead, pacs.done) == ("deliver", 2, 1, 1, 5)
    assert (pacs.retrying, pacs.oldest_waiting_seconds) == (1, 60.0)
    assert (route.lane, route.oldest_waiting_seconds, queue.dead_letters) == ("", 30.0, 1)

    health = views.destinations_view({"pacs": "dicom", "ehr": "hl7"}, groups, now=100.0)
    ehr, pacs_health = health.destinations
    assert (ehr.name, ehr.last_success, ehr.waiting, ehr.oldest_undelivered_seconds) == (
        "ehr",
        None,
        0,
        None,
    )
    assert (pacs_health.last_success, pacs_health.waiting, pacs_health.retrying) == (90.0, 3, 1)
    assert (pacs_health.dead, pacs_health.oldest_undelivered_seconds) == (1, 60.0)


def test_a_dead_letter_shows_a_short_target_and_a_redacted_bounded_error() -> None:
    job = Job(
        id=7,
        stage=Stage.DELIVER,
        subject="pacs|" + "f" * 64,
        state=JobState.DEAD,
        attempts=5,
        run_at=1.0,
        lease_token=None,
        lease_expires=None,
        last_error="refused for DOE^JANE " + "x" * 1000,
        lane="pacs",
        first_failed_at=50.0,
    )
    (letter,) = views.dead_view([job], now=100.0, can_replay=False).dead
    assert letter.target == "f" * 12 and letter.lane == "pacs"
    assert "DOE^JANE" not in letter.last_error and len(letter.last_error) == views.ERROR_CHARS


def run(model: str, kind: str, status: str, at: float, report: str = "") -> ModelRun:
    finding = FindingRecord("nodule", "lung-nodule", "SCT", "1", "Nodule", status)  # type: ignore[arg-type]
    return ModelRun(
        id=f"{model}-{at}",
        kind=kind,  # type: ignore[arg-type]
        subject="s" * 64 if kind == "dicom" else "m" * 32,
        study_key="s" * 64,
        accession_ref="a" * 64,
        modality="CT",
        body_part="CHEST",
        model=model,
        model_version="1.0",
        weights_sha256="0" * 64,
        route="r",
        report_status=report,
        received_at=at,
        complete_at=at,
        inferred_at=at,
        concepts=("lung-nodule",),
        findings=(finding,),
    )


def test_the_findings_view_compares_by_short_study_key_only() -> None:
    found = views.findings_view(
        [run("lung", "dicom", "present", 10.0), run("notes", "hl7", "present", 20.0, "F")],
        days=90,
        now=30.0,
    )
    assert found.runs == 2
    (comparison,) = found.comparisons
    assert (comparison.study, comparison.outcome) == ("s" * 12, "agree")
    (summary,) = found.concordance
    assert summary.true_positive == 1 and summary.sensitivity.value == 1.0
    assert "a" * 64 not in found.model_dump_json() and "s" * 13 not in found.model_dump_json()


class CountingQueue:
    """A real SQLite queue that counts how often the runs themselves are read."""

    def __init__(self, path: Path) -> None:
        self.queue = SQLiteQueue(path)
        self.reads = 0

    def findings_mark(self, since: float) -> tuple[int, float | None, float | None]:
        return self.queue.findings_mark(since)

    def findings_runs(self, flt: RunFilter) -> list[ModelRun]:
        self.reads += 1
        return self.queue.findings_runs(flt)

    def add(self, r: ModelRun) -> None:
        self.queue.enqueue(Stage.INFER, r.id, 1.0, any_payload(Stage.INFER))
        job = self.queue.lease([Stage.INFER], "w", 30, now=1.0)
        assert job is not None
        self.queue.complete(job, now=1.0, run=r)


def test_the_findings_figures_are_added_up_again_only_when_the_runs_change(
    tmp_path: Path,
) -> None:
    counting = CountingQueue(tmp_path / "queue.db")
    queue = cast(Queue, counting)
    figures = FindingsFigures()
    counting.add(run("lung", "dicom", "present", 1_000.0))
    assert figures.view(queue, 1, now=1_100.0).runs == 1
    again = figures.view(queue, 1, now=1_200.0)
    assert (again.runs, again.generated_at, counting.reads) == (1, 1_200.0, 1)  # as of now

    counting.add(run("notes", "hl7", "present", 1_300.0, "F"))  # the report: compared now
    found = figures.view(queue, 1, now=1_400.0)
    assert (found.runs, len(found.comparisons), counting.reads) == (2, 1, 2)
    assert figures.view(queue, 2, now=1_400.0).runs == 2  # another window: its own figures
    assert counting.reads == 3

    counting.queue.purge_findings(1_200.0)
    assert figures.view(queue, 1, now=1_500.0).runs == 1
    # the window moved on past every run: nothing left in it
    assert figures.view(queue, 1, now=1_000.0 + 2 * 86_400).runs == 0
    # and however still the runs, added up again after MAX_AGE
    reads = counting.reads
    figures.view(queue, 1, now=1_000.0 + 2 * 86_400 + FindingsFigures.MAX_AGE)
    assert counting.reads == reads + 1
