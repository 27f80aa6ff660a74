"""What a long association records while it runs (gateway/pipeline.py, DeliveryProgress);
the drill with a worker killed mid-study is in tests/integration/test_faults.py."""

from __future__ import annotations

from typing import cast

import pytest

from gateway import pipeline
from gateway.deliver import Outcome
from gateway.deliver.dicom_scu import InstanceResult
from gateway.errors import QueueUnavailable
from gateway.pipeline import DeliveryProgress
from gateway.store.queue import Queue


class Recorder:
    def __init__(self, failures: int = 0) -> None:
        self.records: list[list[tuple[str, int]]] = []
        self.failures = failures

    def record_deliveries(self, destination: str, done: list[tuple[str, int]], now: float) -> None:
        if self.failures:
            self.failures -= 1
            raise QueueUnavailable("queue database is busy")
        self.records.append(list(done))


def result(key: str, outcome: Outcome = Outcome.DELIVERED) -> InstanceResult:
    return InstanceResult(key, "1.2.3", outcome, 0 if outcome is Outcome.DELIVERED else None, "")


def test_confirmed_instances_are_recorded_every_so_many_and_the_rest_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "PROGRESS_INSTANCES", 3)
    monkeypatch.setattr(pipeline, "PROGRESS_SECONDS", 3600.0)
    queue = Recorder()
    progress = DeliveryProgress(cast(Queue, queue), "pacs", lambda: 1.0)
    for key in ("a", "b", "c", "d"):
        progress(result(key))
    progress(result("x", Outcome.TRANSIENT))  # not confirmed: not recorded
    assert queue.records == [[("a", 0), ("b", 0), ("c", 0)]]
    progress.flush()
    assert queue.records[-1] == [("d", 0)]


def test_a_progress_record_that_fails_is_kept_for_the_next_and_the_send_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "PROGRESS_INSTANCES", 1)
    queue = Recorder(failures=1)
    progress = DeliveryProgress(cast(Queue, queue), "pacs", lambda: 1.0)
    progress(result("a"))  # the queue is busy: no exception here
    progress(result("b"))
    assert queue.records == [[("a", 0), ("b", 0)]]
