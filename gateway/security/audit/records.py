"""What an audit record is: its events, outcomes, parties and objects, how a record is
checked before it is written, and one constructor per kind of record the gateway writes.

The edges do not build records by hand: they call a constructor here
(:func:`association_accepted`, :func:`instances_transferred`, :func:`data_deleted`, ...),
which returns an :class:`AuditEntry`; :class:`~gateway.security.audit.Auditor` (or
:meth:`~gateway.security.audit.AuditLog.write`) writes it.  :func:`validate` turns an
entry into the body of a record, refusing what may not go into the trail (see the package
docstring); the writer adds ``seq``, ``time``, ``prev`` and ``hash``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from gateway.errors import Permanent
from gateway.observability.logging import redact_text

AuditEvent = Literal[
    "association",
    "login",
    "instances-received",
    "message-received",
    "instances-transferred",
    "message-transferred",
    "security-alert",
    "configuration-change",
    "key-rotation",
    "data-deleted",
    "application-activity",
    "re-identification",
    "query",
    "job-replay",
]
# DICOM PS3.15 A.5 EventOutcomeIndicator, in words (0, 4, 8, 12); not a delivery outcome
EventOutcome = Literal["success", "minor-failure", "serious-failure", "major-failure"]

EVENTS: Final[frozenset[str]] = frozenset(get_args(AuditEvent))
OUTCOMES: Final[frozenset[str]] = frozenset(get_args(EventOutcome))
#: ATNA EventOutcomeIndicator values.
OUTCOME_CODES: Final[Mapping[str, int]] = {
    "success": 0,
    "minor-failure": 4,
    "serious-failure": 8,
    "major-failure": 12,
}

#: Participant object types, and what their ``id`` is.
OBJECT_TYPES: Final[Mapping[str, str]] = {
    "study": "Study Instance UID",
    "series": "Series Instance UID",
    "sop-instance": "SOP Instance UID (or only a count)",
    "accession": "Accession Number",
    "message": "HL7 message control id (MSH-10)",
    "envelope": "the gateway's envelope id",
    "certificate": "a certificate's subject, serial or SHA-256 fingerprint",
    "configuration": "the configuration file (path or SHA-256)",
    "data-key": "an at-rest data key id",
    "audit-trail": "an audit trail file",
    "view": "a view of the dashboard (its path, no query values)",
    "job": "a queue job's id",
    "repeats": "how many more records like this one were folded into it (a count)",
}
_UID_TYPES = frozenset({"study", "series", "sop-instance"})
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_dicom_uid(value: str) -> bool:
    """A well-formed DICOM UID (what a study, series or instance object id must be)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


#: Keys allowed in ``actor`` and ``destination``; ``node`` is a configured name (a
#: destination key such as "pacs", a listener such as "dicom-tls"), ``user`` an OS user.
PARTY_KEYS: Final[frozenset[str]] = frozenset(
    {"ae_title", "host", "port", "cert_subject", "application", "facility", "node", "user"}
)

GENESIS: Final[str] = "0" * 64
MAX_ID = 256
MAX_DETAIL = 500
REQUIRED: Final = ("seq", "time", "event", "outcome", "actor", "objects", "prev", "hash")
HEX64: Final = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AuditError(Permanent):
    """The audit trail cannot be written or continued."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


# --- validation: what may go into a record ----------------------------------------------


def _text(value: Any, where: str, limit: int = MAX_ID) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"audit {where} must be a non-empty string, not {value!r:.40}")
    if len(value) > limit or _CONTROL.search(value):
        raise ValueError(f"audit {where} is longer than {limit} or has control characters")
    return value


def _party(party: Mapping[str, Any] | None, where: str) -> dict[str, str | int] | None:
    if party is None:
        return None
    unknown = sorted(set(party) - PARTY_KEYS)
    if unknown:
        raise ValueError(f"audit {where} has unknown keys {unknown}; allowed: {sorted(PARTY_KEYS)}")
    out: dict[str, str | int] = {}
    for key, value in party.items():
        if value is None:
            continue
        if key == "port":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                raise ValueError(f"audit {where}.port must be a port number, not {value!r}")
            out[key] = value
        else:
            out[key] = _text(value, f"{where}.{key}")
    return out


def _object(obj: Mapping[str, Any]) -> dict[str, str | int]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"audit objects must be mappings, not {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in OBJECT_TYPES:
        raise ValueError(
            f"audit object type {kind!r} is not allowed (PHI stays out of the audit trail); "
            f"known types: {sorted(OBJECT_TYPES)}"
        )
    extra = sorted(set(obj) - {"type", "id", "count"})
    if extra:
        raise ValueError(f"audit object of type {kind!r} has unknown keys {extra}")
    if "id" not in obj and "count" not in obj:
        raise ValueError(f"audit object of type {kind!r} needs an 'id' or a 'count'")
    out: dict[str, str | int] = {"type": str(kind)}
    if "id" in obj:
        ident = _text(obj["id"], f"object {kind!r} id")
        if "^" in ident:
            raise ValueError(f"audit object {kind!r} id looks like a person name (has '^')")
        if kind in _UID_TYPES and not is_dicom_uid(ident):
            raise ValueError(f"audit object {kind!r} id is not a DICOM UID")
        out["id"] = ident
    if "count" in obj:
        count = obj["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"audit object {kind!r} count must be an integer >= 0")
        out["count"] = count
    return out


def _detail(detail: str) -> str:
    detail = redact_text(_CONTROL.sub(" ", detail))
    return detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…"


def validate(entry: AuditEntry) -> dict[str, Any]:
    """The body of the record *entry* asks for (event, outcome, actor, destination,
    objects, detail), checked and cleaned.  Raises ValueError for an unknown event,
    outcome, object type or party key, or an object id that may not go into the trail."""
    if entry.event not in EVENTS:
        raise ValueError(f"unknown audit event {entry.event!r}; known: {sorted(EVENTS)}")
    if entry.outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {entry.outcome!r}; known: {sorted(OUTCOMES)}")
    return {
        "event": entry.event,
        "outcome": entry.outcome,
        "actor": _party(entry.actor, "actor") or {},
        "destination": _party(entry.destination, "destination"),
        "objects": [_object(o) for o in entry.objects],
        "detail": _detail(entry.detail),
    }


# --- what a caller asks to record -------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    """One record as a caller asks for it; the writer checks it (:func:`validate`) and
    adds ``seq``, ``time``, ``prev`` and ``hash``.  Made by the constructors below."""

    event: AuditEvent
    outcome: EventOutcome = "success"
    actor: Mapping[str, Any] | None = None
    destination: Mapping[str, Any] | None = None
    objects: tuple[Mapping[str, Any], ...] = ()
    detail: str = ""


def is_refusal(entry: AuditEntry) -> bool:
    """A peer refused at the door (a TLS handshake, an association, a caller or sender not
    allowed, a dashboard request without a valid credential): what a misconfigured or
    hostile peer can repeat many times a second (see :class:`~gateway.security.audit.Auditor`
    for how repeats are written)."""
    return entry.outcome != "success" and entry.event in ("security-alert", "association")


def repeated(entry: AuditEntry, more: int, seconds: float) -> AuditEntry:
    """*entry* again, saying that *more* refusals exactly like it came within *seconds*
    after it was written (the count is the object ``repeats``)."""
    return AuditEntry(
        entry.event,
        entry.outcome,
        actor=entry.actor,
        destination=entry.destination,
        objects=(*entry.objects, {"type": "repeats", "count": more}),
        detail=f"{more} more like this within {seconds:.0f} s: {entry.detail}",
    )


# --- parties ----------------------------------------------------------------------------


def gateway_process() -> dict[str, str]:
    """The running gateway as an actor: its application name, host name and OS user."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "?"
    return {"application": "ai-gateway", "host": socket.gethostname()[:64], "user": user[:64]}


def cli_user() -> dict[str, str]:
    """A ``gateway`` command as an actor: ``gateway-cli`` and the OS user running it."""
    return {"application": "gateway-cli", "user": getpass.getuser()}


def _with_subject(party: dict[str, Any], cert_subject: str | None) -> dict[str, Any]:
    return party | ({"cert_subject": cert_subject[:200]} if cert_subject is not None else {})


# --- one constructor per kind of record -------------------------------------------------

TLSListener = Literal["DICOM", "MLLP"]


def tls_refused(listener: TLSListener, host: str, error: str) -> AuditEntry:
    """A TLS handshake on a listener failed (bad or missing client certificate, ...)."""
    return AuditEntry(
        "security-alert",
        "minor-failure",
        actor={"host": host},
        detail=f"{listener} TLS handshake refused: {error}",
    )


def dicom_caller_refused(
    calling_ae: str, host: str, called_ae: str, *, cert_subject: str | None = None
) -> AuditEntry:
    """A DICOM association refused by the allow-list (``dicom.allowed_callers``)."""
    return AuditEntry(
        "security-alert",
        "minor-failure",
        actor=_with_subject({"ae_title": calling_ae, "host": host}, cert_subject),
        destination={"ae_title": called_ae},
        detail="DICOM association refused: calling AE title and host not allowed",
    )


def association_accepted(calling_ae: str, host: str, called_ae: str) -> AuditEntry:
    """A DICOM association was accepted."""
    return AuditEntry(
        "association",
        actor={"ae_title": calling_ae, "host": host},
        destination={"ae_title": called_ae},
    )


def association_rejected(calling_ae: str, host: str, called_ae: str) -> AuditEntry:
    """A DICOM association rejected by the DICOM layer itself (wrong called AE title,
    too many associations)."""
    return AuditEntry(
        "association",
        "minor-failure",
        actor={"ae_title": calling_ae, "host": host},
        destination={"ae_title": called_ae},
        detail="DICOM association rejected (called AE title or association limit)",
    )


def instances_received(
    calling_ae: str,
    host: str,
    called_ae: str,
    *,
    studies: Iterable[str],
    stored: int,
    duplicates: int,
    refused: int,
    aborted: bool,
) -> AuditEntry:
    """What one DICOM association stored: its studies (the first 50 by UID) and counts."""
    return AuditEntry(
        "instances-received",
        "minor-failure" if refused or aborted else "success",
        actor={"ae_title": calling_ae, "host": host},
        destination={"ae_title": called_ae},
        objects=(
            *({"type": "study", "id": uid} for uid in sorted(studies)[:50]),
            {"type": "sop-instance", "count": stored},
        ),
        detail=f"stored {stored}, duplicates {duplicates}, refused {refused}"
        + (", association aborted" if aborted else ""),
    )


def hl7_sender_refused(
    application: str,
    facility: str,
    host: str,
    control_id: str,
    *,
    cert_subject: str | None = None,
) -> AuditEntry:
    """An HL7 message refused (AR) because its sender is not on ``hl7.allowed_senders``."""
    return AuditEntry(
        "security-alert",
        "minor-failure",
        actor=_with_subject(
            {"application": application[:64], "facility": facility[:64], "host": host},
            cert_subject,
        ),
        objects=({"type": "message", "id": control_id[:64]},),
        detail="HL7 sender not on the allow-list; message refused (AR)",
    )


def messages_received(
    application: str, facility: str, host: str, control_ids: Sequence[str]
) -> AuditEntry:
    """HL7 messages stored (ACK AA) from one sender and host, by MSH-10."""
    return AuditEntry(
        "message-received",
        actor={"application": application, "facility": facility, "host": host},
        objects=tuple({"type": "message", "id": i} for i in control_ids),
        detail=f"{len(control_ids)} messages stored (ACK AA)",
    )


def instances_transferred(
    *,
    calling_ae: str,
    node: str,
    ae_title: str,
    host: str,
    port: int,
    study_uid: str,
    sent: int,
    refused: int,
    retrying: str | None,
    result: bool,
) -> AuditEntry:
    """DICOM instances of one study sent to destination *node* (forwarded, or *result*
    objects): how many arrived, how many were refused, and why the rest will be retried."""
    return AuditEntry(
        "instances-transferred",
        "success" if not (refused or retrying) else "minor-failure",
        actor={"ae_title": calling_ae},
        destination={"node": node, "ae_title": ae_title, "host": host, "port": port},
        objects=(
            *([{"type": "study", "id": study_uid}] if is_dicom_uid(study_uid) else []),
            {"type": "sop-instance", "count": sent},
        ),
        detail=f"{'result' if result else 'forwarded'}: sent {sent}, refused {refused}"
        + (f", will retry: {retrying}" if retrying else ""),
    )


def message_transferred(
    *,
    node: str,
    host: str,
    port: int,
    application: str,
    facility: str,
    control_id: str,
    envelope_id: str,
    result: bool,
    ack: str,
) -> AuditEntry:
    """An HL7 message acknowledged by destination *node*: a stored one forwarded (named
    by its MSH-10 and envelope id) or a *result* built here (by its MSH-10)."""
    return AuditEntry(
        "message-transferred",
        destination={
            "node": node,
            "host": host,
            "port": port,
            "application": application,
            "facility": facility,
        },
        objects=(
            {"type": "message", "id": control_id},
            *([] if result else [{"type": "envelope", "id": envelope_id}]),
        ),
        detail=f"{'result' if result else 'forwarded'}; ACK {ack}",
    )


def configuration_reloaded(
    actor: Mapping[str, Any], config_sha256: str, needs_restart: Sequence[str] = ()
) -> AuditEntry:
    """The configuration was reloaded; *needs_restart* names the settings that keep
    their running values until a restart."""
    return AuditEntry(
        "configuration-change",
        actor=actor,
        objects=({"type": "configuration", "id": config_sha256},),
        detail="reloaded"
        + (f"; needs a restart: {', '.join(needs_restart)}" if needs_restart else ""),
    )


def configuration_rejected(actor: Mapping[str, Any], config_sha256: str, errors: int) -> AuditEntry:
    """A reload found the configuration invalid and kept the running one."""
    return AuditEntry(
        "configuration-change",
        "minor-failure",
        actor=actor,
        objects=({"type": "configuration", "id": config_sha256},),
        detail=f"reload rejected: {errors} errors; running configuration kept",
    )


def application_activity(
    actor: Mapping[str, Any], what: Literal["started", "stopped"]
) -> AuditEntry:
    """The gateway started or stopped."""
    return AuditEntry("application-activity", actor=actor, detail=f"gateway {what}")


def key_rotation(actor: Mapping[str, Any], key_id: str) -> AuditEntry:
    """A new at-rest data key was made current."""
    return AuditEntry(
        "key-rotation",
        actor=actor,
        objects=({"type": "data-key", "id": key_id},),
        detail="new data key made current",
    )


def data_deleted(
    actor: Mapping[str, Any],
    *,
    cutoff: str,
    study_uids: Iterable[str],
    studies: int,
    messages: int,
    spool_files: int,
    kept: int,
    keys_destroyed: Sequence[str],
    limit: int = 200,
) -> AuditEntry:
    """A retention pass: the studies deleted by UID (the first *limit*; the count says
    how many in all), the messages, and the data keys destroyed."""
    uids = [u for u in study_uids if is_dicom_uid(u)]  # the trail takes only UIDs
    return AuditEntry(
        "data-deleted",
        actor=actor,
        objects=(
            *({"type": "study", "id": u} for u in uids[:limit]),
            {"type": "study", "count": studies},
            {"type": "message", "count": messages},
            *({"type": "data-key", "id": k} for k in keys_destroyed),
        ),
        detail=(
            f"retention: deleted {studies} studies and {messages} messages "
            f"received before {cutoff}, {spool_files} spool files; "
            f"{kept} kept for pending or dead jobs; "
            f"{len(keys_destroyed)} data keys destroyed"
        ),
    )


def reidentified(
    actor: Mapping[str, Any], *, study_key: str, study_uid: str, accession: str, reason: str
) -> AuditEntry:
    """Someone turned a pseudonymous study key (from the findings store) back into the
    study's identifiers, for the reason they gave."""
    objects: list[dict[str, Any]] = [{"type": "study", "id": study_uid}] if study_uid else []
    if accession:
        objects.append({"type": "accession", "id": accession})
    return AuditEntry(
        "re-identification",
        actor=actor,
        objects=tuple(objects),
        detail=f"study key {study_key[:16]} re-identified; reason: {reason}",
    )


def dashboard_user(
    name: str, host: str, *, role: str | None = None, cert_subject: str | None = None
) -> dict[str, str]:
    """A dashboard user as an actor: the holder's name in the tokens file (``?`` when the
    request proved no one), with its role, and the client's address."""
    application = f"dashboard:{role}" if role else "dashboard"
    party = {"application": application, "user": name[:64], "host": host[:64]}
    return _with_subject(party, cert_subject)


def dashboard_view(actor: Mapping[str, Any], view: str) -> AuditEntry:
    """A dashboard user read a view (a page's data: queue, studies, dead letters, ...)."""
    return AuditEntry(
        "query", actor=actor, objects=({"type": "view", "id": view[:MAX_ID]},), detail="read"
    )


def audit_trail_read(actor: Mapping[str, Any], trail_name: str, filters: str) -> AuditEntry:
    """Someone read the audit trail (``gateway audit show``), with these filters
    (DICOM's "Audit Log Used")."""
    return AuditEntry(
        "query",
        actor=actor,
        objects=({"type": "audit-trail", "id": trail_name[:MAX_ID]},),
        detail=f"audit trail read; filters: {filters or 'none'}",
    )


def dashboard_refused(actor: Mapping[str, Any], view: str, status: int, reason: str) -> AuditEntry:
    """A dashboard request refused: no valid credential (401) or the wrong role (403)."""
    return AuditEntry(
        "security-alert",
        "minor-failure",
        actor=actor,
        objects=({"type": "view", "id": view[:MAX_ID]},),
        detail=f"dashboard request refused ({status}): {reason}",
    )


def jobs_replayed(actor: Mapping[str, Any], job_ids: Sequence[int], replayed: int) -> AuditEntry:
    """An operator put dead letters back in the queue from the dashboard."""
    return AuditEntry(
        "job-replay",
        "success" if replayed else "minor-failure",
        actor=actor,
        objects=tuple({"type": "job", "id": str(i)} for i in job_ids),
        detail=f"dead letters replayed: {replayed} of {len(job_ids)}",
    )


def torn_line_set_aside(trail_name: str, size: int, after_seq: int, moved_to: str) -> AuditEntry:
    """The writer found an incomplete last line (a crash mid-write) and moved it aside."""
    return AuditEntry(
        "security-alert",
        "minor-failure",
        actor={"application": "ai-gateway"},
        objects=({"type": "audit-trail", "id": trail_name},),
        detail=(
            f"incomplete last line ({size} bytes) after record "
            f"{after_seq} moved to {moved_to}: a write cut short by a crash, "
            "never acknowledged"
        ),
    )
