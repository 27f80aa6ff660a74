"""Retention on a real store: what is done and old goes (rows, spool files, keys), what is
pending or dead stays, and nothing that is still needed is touched."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.envelope import BuildPayload, DeliverPayload, Job, Kind, NextJob, Stage
from gateway.errors import IntegrityError
from gateway.observability.metrics import Metrics
from gateway.security.audit import NO_AUDIT, AuditLog, Auditor
from gateway.security.crypto import KeyStore, key_id_of
from gateway.services.retention import DAY, RetentionBusy, RetentionService, audit_entry, purge
from gateway.store.spool import INLINE_MAX_BYTES
from gateway.store.store import Store
from tests.queues import reopen_test_queue

NOW = time.time()
OLD = NOW - 10 * DAY


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "var", tmp_path / "var" / "keys.json")
    yield s
    s.close()


def ingest_study(store: Store, study_uid: str, at: float, n: int = 2) -> str:
    for i in range(n):
        store.ingest_instance(
            # larger than INLINE_MAX_BYTES: a spool file (a small one would be kept in its row)
            f"DICM-{study_uid}-{i}".encode().ljust(INLINE_MAX_BYTES + 1, b"."),
            sop_instance_uid=f"{study_uid}.{i}",
            study_instance_uid=study_uid,
            attrs={"Modality": ["CT"], "StudyInstanceUID": [study_uid]},
            source="PACS@127.0.0.1",
            quiet=1.0,
            now=at,
        )
    (key,) = store.queue.complete_due_studies(at + 5)
    return key


def ingest_message(store: Store, control_id: str, at: float) -> str:
    ack = store.ingest_message(
        b"MSH|^~\\&|EHR|HOSP|GW|AI|20260101||ORU^R01|" + control_id.encode() + b"|P|2.5\r",
        sender=("EHR", "HOSP"),
        control_id=control_id,
        attrs={"MSH-9": "ORU^R01"},
        source="EHR/HOSP@127.0.0.1",
        build_ack=lambda _id: b"MSA|AA|" + control_id.encode(),
        now=at,
    )
    return ack.envelope_id


def run_all(store: Store, at: float, then: dict[Stage, list[NextJob]] | None = None) -> None:
    """Lease and complete every ready job (each stage's next jobs from *then*)."""
    while True:
        job = store.queue.lease(list(Stage), "test:1", 60, at)
        if job is None:
            return
        store.queue.complete(job, at, (then or {}).pop(job.stage, []))


def lease_one(store: Store, at: float) -> Job:
    job = store.queue.lease(list(Stage), "test:1", 60, at)
    assert job is not None
    return job


def spool_files(store: Store) -> set[str]:
    return {p.name[:-5] for p in store.spool.root.rglob("*.blob") if p.stat().st_size}


def test_done_old_data_goes_with_its_results_and_pending_or_dead_or_recent_data_stays(
    store: Store,
) -> None:
    old = ingest_study(store, "1.2.3.1", OLD)
    result_key = store.spool.put(json.dumps({"findings": []}).encode())
    sr_key = store.spool.put(b"SR object")
    run_all(
        store,
        OLD + 10,
        {
            Stage.ROUTE: [
                NextJob(Stage.BUILD, f"m|{old}", BuildPayload("m", Kind.DICOM, old, result_key))
            ],
            Stage.BUILD: [
                NextJob(
                    Stage.DELIVER,
                    f"pacs|m|{old}",
                    DeliverPayload("pacs", Kind.DICOM, f"m|{old}", "result", (sr_key,)),
                    lane="pacs",
                )
            ],
        },
    )
    message = ingest_message(store, "OLDMSG1", OLD)
    run_all(store, OLD + 10)
    dead_study = ingest_study(store, "1.2.3.2", OLD)
    store.queue.dead(lease_one(store, OLD + 10), "model failed", OLD + 10)
    recent = ingest_study(store, "1.2.3.3", NOW - 60)
    run_all(store, NOW)
    orphan = store.spool.put(b"written, then the gateway crashed before its commit")
    before = spool_files(store)

    dry = purge(store, 7, now=NOW, dry_run=True)
    assert (dry.studies, dry.messages, dry.kept) == (1, 1, 1)
    assert spool_files(store) == before  # a dry run deletes nothing

    report = purge(store, 7, now=NOW)
    assert (report.studies, report.messages, report.kept, report.envelopes) == (1, 1, 1, 3)
    assert report.study_uids == ["1.2.3.1"]
    assert store.queue.study(old) is None and store.queue.study(dead_study) is not None
    assert store.queue.study(recent) is not None
    with pytest.raises(KeyError):
        store.queue.envelope(message)
    assert store.find_instance("1.2.3.1.0") is None  # sent again, it is new again
    assert store.find_instance("1.2.3.2.0") and store.find_instance("1.2.3.3.1")
    gone = before - spool_files(store)
    # the old study's two instances, its result and SR; the crash orphan is younger than
    # the cutoff here, so it stays until a later pass
    assert {result_key, sr_key} <= gone and len(gone) == 4 and orphan not in gone
    for env in store.queue.study_envelopes(dead_study) + store.queue.study_envelopes(recent):
        assert store.read(env.id)[1].startswith(b"DICM")
    counts = store.queue.counts()
    assert counts["jobs:route"] == {"done": 1, "dead": 1}

    entry = audit_entry(report, {"application": "ai-gateway"})
    assert {"type": "study", "id": "1.2.3.1"} in entry.objects
    assert "deleted 1 studies and 1 messages" in entry.detail


def test_orphans_older_than_the_cutoff_are_swept_and_spares_are_left(store: Store) -> None:
    orphan = store.spool.put(b"orphan")
    kept = ingest_study(store, "1.2.9", NOW)  # its job is waiting
    later = NOW + 3 * DAY
    report = purge(store, 1, now=later)
    assert report.kept == 1 and report.files == 1
    assert orphan not in spool_files(store)
    assert store.queue.study_envelopes(kept)
    assert all(store.spool.exists(e.spool_key or "") for e in store.queue.study_envelopes(kept))


def test_a_rotated_key_is_destroyed_once_nothing_it_sealed_is_left(
    store: Store, tmp_path: Path
) -> None:
    old = ingest_study(store, "1.2.4", OLD)
    run_all(store, OLD + 10)
    first_key = store.keys.current
    blob = next(p for p in store.spool.root.rglob("*.blob") if p.stat().st_size)
    copy, copy_key = blob.read_bytes(), blob.name[:-5]  # e.g. a backup
    store.keys.rotate()
    recent = ingest_study(store, "1.2.5", NOW)

    # a key replaced moments ago is kept: a running gateway may still be sealing with it
    assert purge(store, 7, now=time.time()).keys_destroyed == []
    report = purge(store, 7, now=time.time() + 2 * 3600)
    assert report.keys_destroyed == [first_key]
    on_disk = KeyStore.open(tmp_path / "var" / "keys.json", create=False)
    assert first_key not in on_disk.key_ids and on_disk.current == store.keys.current
    with pytest.raises(IntegrityError, match="unknown data key"):
        store.sealer.open(copy, copy_key.encode())  # the copy is unreadable now
    assert store.queue.study(old) is None
    for env in store.queue.study_envelopes(recent):
        assert store.read(env.id)[1].startswith(b"DICM")  # sealed with the current key
    # a key still in use is kept
    store.keys.rotate()
    assert purge(store, 7, now=time.time() + 2 * 3600).keys_destroyed == []


def test_a_rotation_by_another_process_is_used_for_the_next_object(
    store: Store, tmp_path: Path
) -> None:
    """`gateway keys rotate` beside a running gateway: the gateway seals with the new key
    within a second, so the old key can be destroyed once its objects are gone."""
    before = store.keys.current
    other = KeyStore.open(tmp_path / "var" / "keys.json", create=False)  # the CLI
    new = other.rotate()
    store.keys._checked -= 2  # a second has passed
    key = store.spool.put(b"after the rotation")
    assert store.keys.current == new.key_id != before
    head = store.spool.path_for(key).read_bytes()[:64]
    assert key_id_of(head) == new.key_id


def test_a_message_dead_lettered_is_kept_until_replayed_and_done(store: Store) -> None:
    env = ingest_message(store, "DEAD1", OLD)
    store.queue.dead(lease_one(store, OLD), "AR from the EHR", OLD)
    assert purge(store, 7, now=NOW).kept == 1
    assert store.read(env)[0].kind is Kind.HL7
    store.queue.replay(None, NOW)
    run_all(store, NOW)
    assert purge(store, 7, now=NOW).messages == 1


def test_a_study_sent_again_while_it_is_being_purged_is_kept(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store.sqlite import SQLiteQueue

    key = ingest_study(store, "1.2.7", OLD)
    run_all(store, OLD + 10)
    pacs = SQLiteQueue(tmp_path / "var" / "queue.sqlite3")  # another connection: the SCP
    original = store.queue._tx

    def resent_meanwhile():  # type: ignore[no-untyped-def]
        pacs.touch_study(key, time.time(), 1.0)  # an instance arrives again: reopened
        return original()

    monkeypatch.setattr(store.queue, "_tx", resent_meanwhile)
    report = purge(store, 7, now=NOW)
    pacs.close()
    assert (report.studies, report.kept) == (0, 1)
    assert store.queue.study(key) is not None
    assert all(store.read(e.id)[1] for e in store.queue.study_envelopes(key))


def test_the_retention_service_deletes_counts_and_audits_a_pass(
    store: Store, tmp_path: Path
) -> None:
    key = ingest_study(store, "1.2.7", OLD)
    run_all(store, OLD + 10)
    metrics = Metrics()
    trail = AuditLog.open(tmp_path / "audit.jsonl")
    service = RetentionService(
        lambda: Store(tmp_path / "var", tmp_path / "var" / "keys.json", create=False),
        1,
        metrics=metrics,
        audit=Auditor(trail),
    )
    report = service.run_once(1)
    assert report.studies == 1 and not store.queue.study_envelopes(key)
    assert metrics.registry.get_sample_value("gateway_purged_total", {"kind": "study"}) == 1
    assert service.run_once(1).studies == 0  # nothing left: nothing recorded
    trail.close()
    (line,) = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    rec = json.loads(line)
    assert rec["event"] == "data-deleted" and rec["actor"]["application"] == "ai-gateway"
    assert {"type": "study", "id": "1.2.7"} in rec["objects"]


def test_a_retention_service_without_a_retention_starts_nothing(tmp_path: Path) -> None:
    service = RetentionService(
        lambda: Store(tmp_path, tmp_path / "keys.json"), None, metrics=Metrics(), audit=NO_AUDIT
    )
    service.start()
    assert not any(t.name == "retention" for t in threading.enumerate())
    service.stop()


def test_one_retention_pass_at_a_time_on_the_whole_site(store: Store, tmp_path: Path) -> None:
    """While another process or node holds the retention lock, a pass is skipped (the CLI
    says so; the service logs it and tries again next hour); a dry run needs no lock."""
    ingest_study(store, "1.2.9.1", OLD)
    run_all(store, OLD + 10)
    other = reopen_test_queue(store.queue)  # another node's connection
    try:
        with other.exclusive("retention") as theirs:
            assert theirs
            with pytest.raises(RetentionBusy, match="another gateway process or node"):
                purge(store, 7, now=NOW)
            assert purge(store, 7, now=NOW, dry_run=True).studies == 1
            service = RetentionService(
                lambda: Store(tmp_path / "var", tmp_path / "var" / "keys.json", create=False),
                7,
                metrics=Metrics(),
                audit=NO_AUDIT,
            )
            assert service.run_once(7).studies == 0
        assert purge(store, 7, now=NOW).studies == 1  # released: the next pass runs
    finally:
        other.close()
