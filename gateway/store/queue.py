"""The queue protocol: the gateway's only state besides the spool.

One implementation per engine (SQLite now; PostgreSQL for scale-out).  Every transition
is a guarded update that names the job and its lease token, so a worker whose lease
expired cannot overwrite the worker that took over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.envelope import Envelope, Job, Stage


@dataclass(frozen=True)
class Ack:
    """What the ingest edge answers: whether the object is new, and (HL7) the stored ACK."""

    new: bool
    envelope_id: str
    ack: bytes | None = None


@dataclass(frozen=True)
class StudyInfo:
    study_key: str
    state: str
    instances: int
    generation: int
    reopened: bool
    last_at: float
    complete_due: float


class Queue(Protocol):
    # ingest: one transaction each, committed before the edge answers success
    def record_instance(self, env: Envelope, sealed_attrs: bytes, quiet: float) -> Ack: ...
    def touch_study(self, study_key: str, now: float, quiet: float) -> None: ...
    def record_message(
        self, env: Envelope, sealed_message: bytes, sealed_attrs: bytes, ack: bytes
    ) -> Ack: ...

    # study assembly
    def complete_due_studies(self, now: float) -> list[str]: ...
    def study(self, study_key: str) -> StudyInfo | None: ...

    # jobs
    def enqueue(
        self, stage: Stage, subject: str, run_at: float, payload: dict[str, object]
    ) -> int: ...
    def lease(self, stages: list[Stage], worker: str, seconds: float, now: float) -> Job | None: ...
    def heartbeat(self, job: Job, seconds: float, now: float) -> Job: ...
    def complete(self, job: Job, now: float) -> None: ...
    def fail(self, job: Job, error: str, retry_at: float, now: float) -> None: ...
    def dead(self, job: Job, error: str, now: float) -> None: ...
    def replay(self, job_ids: list[int] | None, now: float) -> int: ...
    def sweep_expired(self, now: float) -> int: ...

    # reading
    def envelope(self, envelope_id: str) -> tuple[Envelope, bytes, bytes | None]: ...
    def counts(self) -> dict[str, dict[str, int]]: ...
    def dead_jobs(self) -> list[Job]: ...
    def close(self) -> None: ...
