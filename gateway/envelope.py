"""The one record that flows through the gateway's stages."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    DICOM = "dicom"
    HL7 = "hl7"


class Stage(enum.StrEnum):
    """Job stages.  ASSEMBLE is implicit (study timers); ROUTE is the first queued job."""

    ROUTE = "route"
    INFER = "infer"
    BUILD = "build"
    DELIVER = "deliver"


class JobState(enum.StrEnum):
    READY = "ready"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope:
    """One received thing: a DICOM instance or an HL7 message.

    ``source`` names the peer (calling AE and host, or MSH-3/MSH-4 and host): no PHI.
    ``attrs`` holds the routing attributes; it is stored encrypted, never logged.
    ``dedup_key`` and ``study_key`` are keyed hashes of the identifiers.
    """

    id: str
    kind: Kind
    source: str
    received_at: float
    dedup_key: str
    spool_key: str | None = None
    study_key: str | None = None
    size: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Envelope:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Job:
    id: int
    stage: Stage
    subject: str
    state: JobState
    attempts: int
    run_at: float
    lease_token: str | None
    lease_expires: float | None
    last_error: str | None
    payload: dict[str, Any] = field(default_factory=dict)
    lane: str = ""
    first_failed_at: float | None = None


@dataclass(frozen=True)
class NextJob:
    """A job that a finished stage asks for; enqueued in the same transaction."""

    stage: Stage
    subject: str
    payload: dict[str, Any] = field(default_factory=dict)
    lane: str = ""
    run_at: float | None = None
