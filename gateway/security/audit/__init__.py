"""The audit trail: who sent what, and where it went, in a tamper-evident file.

One JSON object per line, appended, never rewritten, kept apart from the application logs.
The events follow DICOM PS3.15 A.5 / IHE ATNA (RFC 3881) in spirit, written as JSON:

=========================  ==========================================================
event                      when
=========================  ==========================================================
``association``            a DICOM association was accepted or refused
``login``                  an HL7/MLLP connection or a TLS session was established
                           (or failed)
``instances-received``     DICOM instances were stored (per association or study)
``message-received``       an HL7 message was stored
``instances-transferred``  DICOM instances left the gateway (forwarded, or results)
``message-transferred``    an HL7 message left the gateway (forwarded, or a result)
``security-alert``         a peer was rejected, a certificate was bad, TLS failed,
                           tampering was detected
``configuration-change``   the configuration was (re)loaded
``key-rotation``           a new at-rest data key was made current
``data-deleted``           retention deleted studies and messages (and data keys)
``application-activity``   the gateway started or stopped
``re-identification``      a study key of the findings store was turned back into the
                           study's identifiers (``gateway findings reidentify``)
``query``                  a dashboard view was read, or the audit trail itself
                           (``gateway audit show``)
``job-replay``             an operator replayed a dead letter from the dashboard
=========================  ==========================================================

Each record::

    {"seq": 7, "time": "2025-01-31T12:00:00.123Z", "event": "instances-received",
     "outcome": "success", "actor": {"ae_title": "PACS", "host": "10.0.0.5"},
     "destination": {"ae_title": "AI_GATEWAY"}, "objects": [{"type": "study", "id": "1.2.3"},
     {"type": "sop-instance", "count": 300}], "detail": "", "prev": "<hex>", "hash": "<hex>"}

``outcome`` is the ATNA EventOutcomeIndicator by name (:data:`OUTCOME_CODES`: 0, 4, 8, 12).
``actor`` is who did it, ``destination`` where it went; both take only the keys in
:data:`PARTY_KEYS`.  ``objects`` are participant objects whose ``type`` is one of
:data:`OBJECT_TYPES`, with an ``id`` and/or a ``count``: identifiers the audit reader may
see (UIDs, accession numbers, MSH-10), never names.  UIDs are checked to be UIDs, and no
``id`` may contain ``^`` (the shape of a person name in DICOM and HL7); ``detail`` goes
through the log redaction's PHI patterns.  The caller still must not pass names.

The hash chain: ``prev`` is the previous record's ``hash`` (``"0" * 64`` for the first);
``hash`` is the SHA-256 of the record's canonical JSON (sorted keys, no spaces, UTF-8)
without ``hash``.  :func:`verify` finds the first edited, missing, reordered or inserted
record.  A plain hash chain cannot show that records were cut off the *end*, nor stop
someone who rewrites the whole tail with fresh hashes: the syslog copy
(:class:`SyslogForwarder`) and the ``anchor`` argument of :func:`verify` (a ``(seq,
hash)`` taken from :attr:`AuditLog.head` and kept elsewhere) are the external witnesses.

Durability: :meth:`AuditLog.record` writes the line, then ``fsync``; it returns only once
the record is on disk.  That costs one fsync: 0.2 to 4 ms on this project's CI disk,
mean 0.7 to 2 ms, p99 4 to 8 ms (the JSON and the hash take about 10 us).  Threads
recording at once share fsyncs (group commit): 4 threads wrote 800 records in 0.35 to
0.4 s, where one fsync each took 1.4 to 2 s.  Call it off the acknowledgement path.
Records reach the syslog forwarder only once they are durable here.

A crash during a write can leave an incomplete last line.  That record was never
acknowledged, so :meth:`AuditLog.open` moves the fragment to ``<file>.torn-<n>`` (fsync'd),
cuts the trail back to its last complete record, and appends a ``security-alert`` record
saying so: the repair is itself in the chain, and :func:`verify` reports the torn line
until then.

Several processes may append to one file (``gateway run`` and ``gateway keys rotate``):
each record is written under an exclusive ``flock``, after re-reading the tail if another
writer moved it.

The package: :mod:`~gateway.security.audit.records` (the schema, its checks, and one
constructor per kind of record), :mod:`~gateway.security.audit.writer` (:class:`AuditLog`),
:mod:`~gateway.security.audit.verify`, :mod:`~gateway.security.audit.syslog` (RFC 5424 and
the forwarder) and :mod:`~gateway.security.audit.auditor` (:class:`Auditor`, what the
edges call: ``auditor(records.messages_received(...))``).
"""

from gateway.security.audit import records
from gateway.security.audit.auditor import NO_AUDIT, Auditor
from gateway.security.audit.records import (
    EVENTS,
    GENESIS,
    MAX_DETAIL,
    MAX_ID,
    OBJECT_TYPES,
    OUTCOME_CODES,
    OUTCOMES,
    PARTY_KEYS,
    AuditEntry,
    AuditError,
    AuditEvent,
    EventOutcome,
    canonical_json,
    is_dicom_uid,
    record_hash,
)
from gateway.security.audit.syslog import (
    FACILITY_LOG_AUDIT,
    ForwarderStats,
    SyslogForwarder,
    octet_frame,
    rfc5424_message,
)
from gateway.security.audit.verify import VerifyReport, verify
from gateway.security.audit.writer import AuditLog, trail_path

__all__ = [
    "EVENTS",
    "FACILITY_LOG_AUDIT",
    "GENESIS",
    "MAX_DETAIL",
    "MAX_ID",
    "NO_AUDIT",
    "OBJECT_TYPES",
    "OUTCOMES",
    "OUTCOME_CODES",
    "PARTY_KEYS",
    "AuditEntry",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "Auditor",
    "EventOutcome",
    "ForwarderStats",
    "SyslogForwarder",
    "VerifyReport",
    "canonical_json",
    "is_dicom_uid",
    "octet_frame",
    "record_hash",
    "records",
    "rfc5424_message",
    "trail_path",
    "verify",
]
