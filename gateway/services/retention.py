"""Retention: what the gateway is done with goes, and so do the keys that sealed it.

The gateway is a relay, not an archive.  With ``gateway.retention_days`` set, a pass
(hourly in the running gateway, or ``gateway purge``) deletes:

1. complete studies and HL7 messages received before the cutoff whose every job is done
   (routed, run, built, delivered), with their envelopes, jobs, delivery records and
   accession references.  A study or message with a job still waiting, running or dead is
   kept: a dead letter stays replayable until someone deals with it;
2. their spool files: the instances, model results, masks, crosswalks and built SR/SEG/ORU
   objects; and spool files written before the cutoff that no row names (a crash left them
   between a write and its commit);
3. data keys that no stored object is sealed with any more (never the current key, nor
   one replaced less than an hour ago): after a key rotation the old key is destroyed once
   the last object it sealed is gone, so a copy of those files (a backup, a disk image)
   can no longer be decrypted.

:func:`purge` is one pass; :class:`RetentionService` is the thread that the running
gateway starts to run one a minute after the start, then every hour, and records each
pass that deleted something in the audit trail (``data-deleted``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.errors import Transient
from gateway.observability.metrics import Metrics
from gateway.security.audit import AuditEntry, Auditor, records
from gateway.security.crypto import key_id_of
from gateway.store.store import Store, attr_text

__all__ = [
    "DAY",
    "FIRST_PASS",
    "INTERVAL",
    "PurgeReport",
    "RetentionService",
    "audit_entry",
    "purge",
    "purge_findings",
]

log = structlog.get_logger(__name__)

DAY = 86400.0
FIRST_PASS = 60.0  # seconds after the start
INTERVAL = 3600.0


@dataclass
class PurgeReport:
    cutoff: float
    dry_run: bool
    studies: int = 0
    messages: int = 0
    envelopes: int = 0
    kept: int = 0  # old enough, but a job is waiting, running or dead
    files: int = 0
    bytes: int = 0
    keys_destroyed: list[str] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)
    findings_runs: int = 0  # model runs deleted from the findings store (their own cutoff)

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings_runs": self.findings_runs,
            "cutoff": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.cutoff)),
            "dry_run": self.dry_run,
            "studies": self.studies,
            "messages": self.messages,
            "envelopes": self.envelopes,
            "kept": self.kept,
            "spool_files": self.files,
            "spool_bytes": self.bytes,
            "keys_destroyed": self.keys_destroyed,
        }


class RetentionBusy(Transient):
    """Another process or node is running a retention pass now; this one is skipped."""


def purge(
    store: Store, older_than_days: float, *, now: float | None = None, dry_run: bool = False
) -> PurgeReport:
    """One retention pass over *store* (see the module docstring).  One pass at a time on
    the whole site (every node sharing the queue database): while another holds the
    ``retention`` lock this raises :class:`RetentionBusy` (a dry run deletes nothing and
    needs no lock)."""
    if dry_run:
        return _purge(store, older_than_days, now, dry_run=True)
    with store.queue.exclusive("retention") as mine:
        if not mine:
            raise RetentionBusy(
                "another gateway process or node is running a retention pass now; this one "
                "is skipped (the next one follows within the hour)"
            )
        return _purge(store, older_than_days, now, dry_run=False)


def _purge(
    store: Store, older_than_days: float, now: float | None, *, dry_run: bool
) -> PurgeReport:
    now = time.time() if now is None else now
    cutoff = now - older_than_days * DAY
    report = PurgeReport(cutoff=cutoff, dry_run=dry_run)
    rows = store.queue.purge_rows(cutoff, dry_run=dry_run)
    report.studies, report.messages, report.kept = len(rows.studies), len(rows.messages), rows.kept
    report.envelopes = rows.envelopes
    for envelope_id, sealed in rows.study_attrs:
        uid = _study_uid(store, envelope_id, sealed)
        if uid:
            report.study_uids.append(uid)
    for key in rows.spool_keys:
        size = store.spool.size(key)
        if size is not None:
            report.files += 1
            report.bytes += size
            if not dry_run:
                store.spool.discard(key)
    # and what no row names: left by a crash between a write and its commit
    orphans, orphan_bytes = store.spool.sweep(
        cutoff, store.queue.referenced_spool_keys(), dry_run=dry_run
    )
    report.files += orphans
    report.bytes += orphan_bytes
    if not dry_run and len(store.keys.key_ids) > 1:
        used = store.spool.key_ids_in_use()
        used |= {key_id_of(head) for head in store.queue.sealed_blobs()}
        unused = [k for k in store.keys.key_ids if k not in used]
        report.keys_destroyed = store.keys.forget(unused, now=now)
    return report


def purge_findings(
    store: Store, older_than_days: float, *, now: float | None = None, dry_run: bool = False
) -> int:
    """Delete the findings store's model runs inferred more than *older_than_days* ago
    (``findings.retention_days``); how many runs (a dry run counts them)."""
    now = time.time() if now is None else now
    return store.queue.purge_findings(now - older_than_days * DAY, dry_run=dry_run)


def _study_uid(store: Store, envelope_id: str, sealed: bytes) -> str:
    """The Study Instance UID kept in an instance's routing attributes (for the audit)."""
    if not envelope_id or not sealed:
        return ""
    try:
        attrs = json.loads(store.sealer.open(sealed, b"attrs:" + envelope_id.encode()))
    except Exception:
        return ""
    return attr_text(attrs, "StudyInstanceUID")


def audit_entry(report: PurgeReport, actor: Mapping[str, Any]) -> AuditEntry:
    """The ``data-deleted`` audit record of a pass by *actor*."""
    return records.data_deleted(
        actor,
        cutoff=report.as_dict()["cutoff"],
        study_uids=report.study_uids,
        studies=report.studies,
        messages=report.messages,
        spool_files=report.files,
        kept=report.kept,
        keys_destroyed=report.keys_destroyed,
    )


class RetentionService:
    """With a retention of *days* (``gateway.retention_days``, a restart-only setting): a
    retention pass a minute after :meth:`start`, then every hour (more often when the
    retention is shorter than a few hours), each on its own store connection so that its
    scans never hold the ingest connection's lock.  A failed pass is logged and the next
    one tries again.  Without a retention, :meth:`start` starts nothing."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        days: float | None,
        *,
        metrics: Metrics,
        audit: Auditor,
        findings_days: float | None = None,
    ) -> None:
        """*open_store* opens the store a pass works on (its own connection, not durable
        per commit: a lost deletion is done again by the next pass).  *findings_days*:
        ``findings.retention_days``, the findings store's own retention."""
        self.open_store, self.days = open_store, days
        self.findings_days = findings_days
        self.metrics = metrics
        self.audit = audit
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        shortest = min(d for d in (self.days, self.findings_days, math.inf) if d is not None)
        if shortest < math.inf and self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(shortest,), name="retention")
            self._thread.start()

    def request_stop(self) -> None:
        """No new pass starts; one under way finishes (:meth:`stop` waits for it)."""
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _loop(self, days: float) -> None:
        every = min(INTERVAL, days * DAY / 4)
        wait = min(FIRST_PASS, every)
        while not self._stopping.wait(wait):
            wait = every
            try:
                self.run_once(self.days)
            except Exception as exc:  # the next pass tries again
                log.error("retention.failed", error=type(exc).__name__, detail=str(exc)[:200])

    def run_once(self, days: float | None) -> PurgeReport:
        """One pass now (studies and messages after *days*, when given; the findings store
        after its own retention): deletes, counts it in the metrics and, when it deleted
        something, records it in the audit trail and the log."""
        store = self.open_store()
        try:
            report = (
                purge(store, days)
                if days is not None
                else PurgeReport(cutoff=time.time(), dry_run=False)
            )
            if self.findings_days is not None:
                report.findings_runs = purge_findings(store, self.findings_days)
        except RetentionBusy:
            log.info("retention.skipped", reason="another process or node is running a pass")
            return PurgeReport(cutoff=time.time() - (days or 0) * DAY, dry_run=False)
        finally:
            store.close()
        self.metrics.purged.labels(kind="study").inc(report.studies)
        self.metrics.purged.labels(kind="message").inc(report.messages)
        if report.findings_runs:
            log.info("retention.findings", runs=report.findings_runs)
        if report.studies or report.messages or report.files or report.keys_destroyed:
            self.audit(audit_entry(report, records.gateway_process()))
            log.info("retention.done", **report.as_dict())
        return report
