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
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.security.audit import AuditEntry, records
from gateway.security.crypto import key_id_of
from gateway.store.store import Store

DAY = 86400.0


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

    def as_dict(self) -> dict[str, Any]:
        return {
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


def purge(
    store: Store, older_than_days: float, *, now: float | None = None, dry_run: bool = False
) -> PurgeReport:
    """One retention pass over *store* (see the module docstring)."""
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


def _study_uid(store: Store, envelope_id: str, sealed: bytes) -> str:
    """The Study Instance UID kept in an instance's routing attributes (for the audit)."""
    if not envelope_id or not sealed:
        return ""
    try:
        attrs = json.loads(store.sealer.open(sealed, b"attrs:" + envelope_id.encode()))
    except Exception:
        return ""
    value = attrs.get("StudyInstanceUID")
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value or "")


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
