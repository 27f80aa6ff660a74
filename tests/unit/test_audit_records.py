"""The typed constructors of audit records: each kind of record has one shape, written
as the trail has always held it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.security.audit import AuditEntry, AuditLog, records, verify

STUDY = "1.2.826.0.1.3680043.8.498.1"


def clock() -> dt.datetime:
    return dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def written(tmp_path: Path, entry: AuditEntry) -> dict[str, Any]:
    """The record as the trail holds it, without seq, time, prev and hash."""
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, clock=clock) as trail:
        returned = trail.write(entry)
    (line,) = path.read_bytes().splitlines()
    rec = json.loads(line)
    assert rec == returned and verify(path).ok
    return {k: v for k, v in rec.items() if k not in ("seq", "time", "prev", "hash")}


CASES: list[tuple[AuditEntry, dict[str, Any]]] = [
    (
        records.tls_refused("DICOM", "10.0.0.9", "SSLError: certificate unknown"),
        {
            "event": "security-alert",
            "outcome": "minor-failure",
            "actor": {"host": "10.0.0.9"},
            "destination": None,
            "objects": [],
            "detail": "DICOM TLS handshake refused: SSLError: certificate unknown",
        },
    ),
    (
        records.dicom_caller_refused("EVIL", "10.0.0.9", "AI_GATEWAY", cert_subject="CN=x" * 60),
        {
            "event": "security-alert",
            "outcome": "minor-failure",
            "actor": {"ae_title": "EVIL", "host": "10.0.0.9", "cert_subject": ("CN=x" * 60)[:200]},
            "destination": {"ae_title": "AI_GATEWAY"},
            "objects": [],
            "detail": "DICOM association refused: calling AE title and host not allowed",
        },
    ),
    (
        records.association_accepted("PACS", "10.0.0.5", "AI_GATEWAY"),
        {
            "event": "association",
            "outcome": "success",
            "actor": {"ae_title": "PACS", "host": "10.0.0.5"},
            "destination": {"ae_title": "AI_GATEWAY"},
            "objects": [],
            "detail": "",
        },
    ),
    (
        records.association_rejected("PACS", "10.0.0.5", "WRONG"),
        {
            "event": "association",
            "outcome": "minor-failure",
            "actor": {"ae_title": "PACS", "host": "10.0.0.5"},
            "destination": {"ae_title": "WRONG"},
            "objects": [],
            "detail": "DICOM association rejected (called AE title or association limit)",
        },
    ),
    (
        records.instances_received(
            "PACS",
            "10.0.0.5",
            "AI_GATEWAY",
            studies={f"{STUDY}.2", f"{STUDY}.1"},
            stored=3,
            duplicates=1,
            refused=0,
            aborted=True,
        ),
        {
            "event": "instances-received",
            "outcome": "minor-failure",
            "actor": {"ae_title": "PACS", "host": "10.0.0.5"},
            "destination": {"ae_title": "AI_GATEWAY"},
            "objects": [
                {"type": "study", "id": f"{STUDY}.1"},
                {"type": "study", "id": f"{STUDY}.2"},
                {"type": "sop-instance", "count": 3},
            ],
            "detail": "stored 3, duplicates 1, refused 0, association aborted",
        },
    ),
    (
        records.hl7_sender_refused("LAB", "HOSP", "10.0.0.7", "MSG1", cert_subject=None),
        {
            "event": "security-alert",
            "outcome": "minor-failure",
            "actor": {"application": "LAB", "facility": "HOSP", "host": "10.0.0.7"},
            "destination": None,
            "objects": [{"type": "message", "id": "MSG1"}],
            "detail": "HL7 sender not on the allow-list; message refused (AR)",
        },
    ),
    (
        records.messages_received("LAB", "HOSP", "10.0.0.7", ["M1", "M2"]),
        {
            "event": "message-received",
            "outcome": "success",
            "actor": {"application": "LAB", "facility": "HOSP", "host": "10.0.0.7"},
            "destination": None,
            "objects": [{"type": "message", "id": "M1"}, {"type": "message", "id": "M2"}],
            "detail": "2 messages stored (ACK AA)",
        },
    ),
    (
        records.instances_transferred(
            calling_ae="AI_GATEWAY",
            node="pacs",
            ae_title="STORESCP",
            host="10.0.0.8",
            port=104,
            study_uid=STUDY,
            sent=2,
            refused=1,
            retrying="timeout",
            result=False,
        ),
        {
            "event": "instances-transferred",
            "outcome": "minor-failure",
            "actor": {"ae_title": "AI_GATEWAY"},
            "destination": {
                "node": "pacs",
                "ae_title": "STORESCP",
                "host": "10.0.0.8",
                "port": 104,
            },
            "objects": [{"type": "study", "id": STUDY}, {"type": "sop-instance", "count": 2}],
            "detail": "forwarded: sent 2, refused 1, will retry: timeout",
        },
    ),
    (
        records.instances_transferred(
            calling_ae="AI_GATEWAY",
            node="pacs",
            ae_title="STORESCP",
            host="10.0.0.8",
            port=104,
            study_uid="a1b2c3",  # a study key, not a UID: left out
            sent=1,
            refused=0,
            retrying=None,
            result=True,
        ),
        {
            "event": "instances-transferred",
            "outcome": "success",
            "actor": {"ae_title": "AI_GATEWAY"},
            "destination": {
                "node": "pacs",
                "ae_title": "STORESCP",
                "host": "10.0.0.8",
                "port": 104,
            },
            "objects": [{"type": "sop-instance", "count": 1}],
            "detail": "result: sent 1, refused 0",
        },
    ),
    (
        records.message_transferred(
            node="ehr",
            host="10.0.0.6",
            port=2575,
            application="EHR",
            facility="HOSP",
            control_id="MSG9",
            envelope_id="env-1",
            result=False,
            ack="AA",
        ),
        {
            "event": "message-transferred",
            "outcome": "success",
            "actor": {},
            "destination": {
                "node": "ehr",
                "host": "10.0.0.6",
                "port": 2575,
                "application": "EHR",
                "facility": "HOSP",
            },
            "objects": [{"type": "message", "id": "MSG9"}, {"type": "envelope", "id": "env-1"}],
            "detail": "forwarded; ACK AA",
        },
    ),
    (
        records.configuration_reloaded({"application": "ai-gateway"}, "ab" * 32, ["dicom.port"]),
        {
            "event": "configuration-change",
            "outcome": "success",
            "actor": {"application": "ai-gateway"},
            "destination": None,
            "objects": [{"type": "configuration", "id": "ab" * 32}],
            "detail": "reloaded; needs a restart: dicom.port",
        },
    ),
    (
        records.configuration_rejected({"application": "ai-gateway"}, "?", 3),
        {
            "event": "configuration-change",
            "outcome": "minor-failure",
            "actor": {"application": "ai-gateway"},
            "destination": None,
            "objects": [{"type": "configuration", "id": "?"}],
            "detail": "reload rejected: 3 errors; running configuration kept",
        },
    ),
    (
        records.application_activity({"application": "ai-gateway"}, "started"),
        {
            "event": "application-activity",
            "outcome": "success",
            "actor": {"application": "ai-gateway"},
            "destination": None,
            "objects": [],
            "detail": "gateway started",
        },
    ),
    (
        records.key_rotation({"application": "gateway-cli", "user": "ops"}, "k2"),
        {
            "event": "key-rotation",
            "outcome": "success",
            "actor": {"application": "gateway-cli", "user": "ops"},
            "destination": None,
            "objects": [{"type": "data-key", "id": "k2"}],
            "detail": "new data key made current",
        },
    ),
    (
        records.data_deleted(
            {"application": "ai-gateway"},
            cutoff="2025-02-01T00:00:00Z",
            study_uids=[STUDY, "not a uid"],
            studies=2,
            messages=1,
            spool_files=4,
            kept=1,
            keys_destroyed=["k1"],
        ),
        {
            "event": "data-deleted",
            "outcome": "success",
            "actor": {"application": "ai-gateway"},
            "destination": None,
            "objects": [
                {"type": "study", "id": STUDY},
                {"type": "study", "count": 2},
                {"type": "message", "count": 1},
                {"type": "data-key", "id": "k1"},
            ],
            "detail": "retention: deleted 2 studies and 1 messages received before "
            "2025-02-01T00:00:00Z, 4 spool files; 1 kept for pending or dead jobs; "
            "1 data keys destroyed",
        },
    ),
]


@pytest.mark.parametrize(("entry", "expected"), CASES, ids=[c[0].event for c in CASES])
def test_each_constructor_writes_its_record_shape(
    tmp_path: Path, entry: AuditEntry, expected: dict[str, Any]
) -> None:
    assert written(tmp_path, entry) == expected


def test_a_refused_hl7_sender_is_cut_to_the_trail_limits_and_names_its_certificate() -> None:
    entry = records.hl7_sender_refused("A" * 80, "F" * 80, "h", "C" * 80, cert_subject="CN=lab")
    assert entry.actor == {
        "application": "A" * 64,
        "facility": "F" * 64,
        "host": "h",
        "cert_subject": "CN=lab",
    }
    assert entry.objects == ({"type": "message", "id": "C" * 64},)


def test_instances_received_names_at_most_50_studies() -> None:
    entry = records.instances_received(
        "PACS",
        "h",
        "GW",
        studies=[f"{STUDY}.{i}" for i in range(60)],
        stored=60,
        duplicates=0,
        refused=0,
        aborted=False,
    )
    assert entry.outcome == "success"
    assert sum(1 for o in entry.objects if o["type"] == "study") == 50


def test_data_deleted_names_at_most_limit_studies_and_counts_them_all() -> None:
    entry = records.data_deleted(
        {"application": "ai-gateway"},
        cutoff="c",
        study_uids=[f"{STUDY}.{i}" for i in range(5)],
        studies=5,
        messages=0,
        spool_files=0,
        kept=0,
        keys_destroyed=[],
        limit=2,
    )
    ids = [o for o in entry.objects if o["type"] == "study"]
    assert ids == [
        {"type": "study", "id": f"{STUDY}.0"},
        {"type": "study", "id": f"{STUDY}.1"},
        {"type": "study", "count": 5},
    ]


def test_the_process_and_cli_actors_are_valid_parties(tmp_path: Path) -> None:
    process = records.gateway_process()
    assert process["application"] == "ai-gateway" and set(process) == {
        "application",
        "host",
        "user",
    }
    cli = records.cli_user()
    assert cli["application"] == "gateway-cli" and set(cli) == {"application", "user"}
    assert written(tmp_path, records.key_rotation(cli, "k1"))["actor"] == cli


def test_a_malformed_entry_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, clock=clock) as trail:
        with pytest.raises(ValueError, match="person name"):
            trail.write(records.messages_received("LAB", "HOSP", "h", ["DOE^JANE"]))
        with pytest.raises(ValueError, match="not a DICOM UID"):
            trail.write(
                records.instances_received(
                    "PACS",
                    "h",
                    "GW",
                    studies=["x"],
                    stored=0,
                    duplicates=0,
                    refused=0,
                    aborted=False,
                )
            )
    assert path.read_bytes() == b""
