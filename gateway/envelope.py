"""The one record that flows through the gateway's stages, and the jobs that carry it.

A job's payload is a typed record per stage (:class:`RoutePayload`, :class:`InferPayload`,
:class:`BuildPayload`, :class:`DeliverPayload`): what one stage hands the next, checked
when it is read back, never a string-keyed dict passed around.  Queues store it as JSON
(:func:`payload_json` / :func:`payload_from_json`), with the same keys whatever the engine.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


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


class Row(Protocol):
    """A database row read by column name (sqlite3.Row, psycopg's dict rows): what the
    queue engines hand :meth:`Envelope.from_row` and :meth:`Job.from_row`."""

    def __getitem__(self, column: str, /) -> Any: ...


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
    late: bool = False  # an instance that reopened its complete study

    @classmethod
    def from_row(cls, row: Row) -> Envelope:
        """An envelope from its row in the ``envelopes`` table (the same columns on every
        engine); its attributes stay sealed in the row."""
        return cls(
            id=row["id"],
            kind=Kind(row["kind"]),
            source=row["source"],
            received_at=row["received_at"],
            dedup_key=row["dedup_key"],
            spool_key=row["spool_key"],
            study_key=row["study_key"],
            size=row["size"],
            late=bool(row["late"]),
        )

    def replace(self, **changes: Any) -> Envelope:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RoutePayload:
    """Route a study (completed after its quiet period: ``generation`` counts the times it
    was completed, ``reopened`` says a late instance opened it again) or a message."""

    kind: Kind | None = None  # None: a job from an old version (the worker looks it up)
    generation: int = 0
    reopened: bool = False


@dataclass(frozen=True)
class InferPayload:
    """Run ``model`` on ``target`` (a study key or a message's envelope id); ``send`` the
    results to these destinations; ``route`` names the route that asked."""

    model: str
    kind: Kind
    target: str
    send: tuple[str, ...] = ()
    route: str | None = None


@dataclass(frozen=True)
class BuildPayload:
    """Build what each ``send`` destination takes from a stored model result: ``result``,
    ``mask`` and ``crosswalk`` are spool keys (the crosswalk when the model saw
    de-identified input)."""

    model: str
    kind: Kind
    target: str
    result: str
    send: tuple[str, ...] = ()
    route: str | None = None
    mask: str | None = None
    crosswalk: str | None = None


@dataclass(frozen=True)
class DeliverPayload:
    """Send to ``destination``: the received study or message itself (``mode`` forward), or
    the built result ``objects`` (spool keys; ``mode`` result) of the study ``study_uid``."""

    destination: str
    kind: Kind
    target: str
    mode: Literal["forward", "result"]
    objects: tuple[str, ...] = ()
    study_uid: str = ""


Payload = RoutePayload | InferPayload | BuildPayload | DeliverPayload

PAYLOAD_TYPES: dict[Stage, type[Payload]] = {
    Stage.ROUTE: RoutePayload,
    Stage.INFER: InferPayload,
    Stage.BUILD: BuildPayload,
    Stage.DELIVER: DeliverPayload,
}


class PayloadError(ValueError):
    """A stored job payload does not fit its stage's record."""


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # each payload record's field names


def payload_json(payload: Payload) -> str:
    """The payload as stored: a JSON object with the record's fields (enums as values,
    tuples as lists).  The records are flat, so this is ``dataclasses.asdict`` without its
    recursive deep copy (a tenth of the HL7 listener's time per message)."""
    data: dict[str, Any] = {}
    names = _FIELD_NAMES.get(type(payload))
    if names is None:
        names = _FIELD_NAMES[type(payload)] = tuple(f.name for f in dataclasses.fields(payload))
    for name in names:
        value = getattr(payload, name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    return json.dumps(data, sort_keys=True)


def payload_from_json(stage: Stage, text: str | bytes) -> Payload:
    """The typed payload of a stored *stage* job.  Keys the record does not know are
    ignored (a newer version's additions); a missing required key or a wrong type is a
    :class:`PayloadError` naming it."""
    cls = PAYLOAD_TYPES[stage]
    try:
        data = json.loads(text or "{}")
    except ValueError as exc:
        raise PayloadError(f"{stage} payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError(f"{stage} payload is not a JSON object")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or (data[f.name] is None and f.default is None):
            continue
        value = data[f.name]
        if f.name == "kind":
            try:
                value = Kind(value)
            except ValueError:
                raise PayloadError(f"{stage} payload: unknown kind {value!r}") from None
        elif f.name in ("send", "objects"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PayloadError(f"{stage} payload: '{f.name}' is not a list of names")
            value = tuple(value)
        values[f.name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise PayloadError(f"{stage} payload: {exc}") from None


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
    payload_text: str = "{}"  # as stored; read it as :attr:`payload`
    lane: str = ""
    first_failed_at: float | None = None
    worker: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> Job:
        """A job from its row in the ``jobs`` table (the same columns on every engine)."""
        return cls(
            id=int(row["id"]),
            stage=Stage(row["stage"]),
            subject=row["subject"],
            state=JobState(row["state"]),
            attempts=row["attempts"],
            run_at=row["run_at"],
            lease_token=row["lease_token"],
            lease_expires=row["lease_expires"],
            last_error=row["last_error"],
            payload_text=row["payload"],
            lane=row["lane"],
            first_failed_at=row["first_failed_at"],
            worker=row["worker"],
        )

    @functools.cached_property
    def payload(self) -> Payload:
        """The stage's typed payload; :class:`PayloadError` when the stored one does not
        fit (a queue dead-letters such a job when a worker leases it)."""
        return payload_from_json(self.stage, self.payload_text)


@dataclass(frozen=True)
class NextJob:
    """A job that a finished stage asks for; enqueued in the same transaction."""

    stage: Stage
    subject: str
    payload: Payload
    lane: str = ""
    run_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.payload, PAYLOAD_TYPES[self.stage]):
            raise TypeError(f"a {self.stage} job takes a {PAYLOAD_TYPES[self.stage].__name__}")
