"""At-rest encryption with real key files: sealing, tamper detection, key file, rotation, spool."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import IntegrityError, KeyStoreError
from gateway.security.crypto import MAGIC, NONCE_BYTES, TAG_BYTES, KeyStore, Sealer
from gateway.store.queue import Ack
from gateway.store.spool import INLINE_MAX_BYTES, Spool
from gateway.store.store import Store

PLAINTEXT = b"DICM-like bytes with PatientName DOE^JANE and MRN 12345678"


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.open(tmp_path / "keys" / "keys.json")


@pytest.fixture
def sealer(keys: KeyStore) -> Sealer:
    return Sealer(keys)


def header_key_id(blob: bytes) -> str:
    assert blob[:4] == MAGIC
    return blob[5 : 5 + blob[4]].decode("ascii")


# --- sealing ------------------------------------------------------------------------------


def test_seal_then_open_returns_the_plaintext(sealer: Sealer) -> None:
    blob = sealer.seal(PLAINTEXT, b"obj-1")
    assert sealer.open(blob, b"obj-1") == PLAINTEXT


def test_blob_layout_is_magic_key_id_nonce_ciphertext_tag(sealer: Sealer, keys: KeyStore) -> None:
    blob = sealer.seal(PLAINTEXT, b"obj-1")
    kid = keys.current.encode()
    assert blob[:4] == b"GWE1"
    assert blob[4] == len(kid)
    assert blob[5 : 5 + len(kid)] == kid
    assert len(blob) == 5 + len(kid) + NONCE_BYTES + len(PLAINTEXT) + TAG_BYTES


def test_sealing_the_same_plaintext_twice_uses_fresh_nonces(sealer: Sealer) -> None:
    a, b = sealer.seal(PLAINTEXT, b"ctx"), sealer.seal(PLAINTEXT, b"ctx")
    assert a != b
    assert sealer.open(a, b"ctx") == sealer.open(b, b"ctx") == PLAINTEXT


def test_seal_stream_produces_a_blob_that_open_reads(sealer: Sealer) -> None:
    chunks = [PLAINTEXT[:10], PLAINTEXT[10:30], PLAINTEXT[30:]]
    blob = b"".join(sealer.seal_stream(iter(chunks), b"stream"))
    assert sealer.open(blob, b"stream") == PLAINTEXT


def test_empty_plaintext_round_trips(sealer: Sealer) -> None:
    assert sealer.open(sealer.seal(b"", b"c"), b"c") == b""


def test_blob_opened_under_another_context_fails_authentication(sealer: Sealer) -> None:
    """A blob moved or copied to another object's name does not decrypt."""
    blob = sealer.seal(PLAINTEXT, b"2024010112-aaaa")
    with pytest.raises(IntegrityError, match="failed authentication"):
        sealer.open(blob, b"2024010112-bbbb")


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_a_flipped_byte_in_the_body_fails_authentication(sealer: Sealer, where: str) -> None:
    blob = bytearray(sealer.seal(PLAINTEXT, b"ctx"))
    start = 5 + blob[4]
    index = {"nonce": start, "ciphertext": start + NONCE_BYTES + 3, "tag": len(blob) - 1}[where]
    blob[index] ^= 0x01
    with pytest.raises(IntegrityError, match="failed authentication"):
        sealer.open(bytes(blob), b"ctx")


def test_a_flipped_magic_byte_is_not_a_gateway_blob(sealer: Sealer) -> None:
    blob = bytearray(sealer.seal(PLAINTEXT, b"ctx"))
    blob[0] ^= 0x01
    with pytest.raises(IntegrityError, match="not an encrypted gateway blob"):
        sealer.open(bytes(blob), b"ctx")


def test_a_key_id_changed_to_another_ascii_name_is_an_unknown_key(sealer: Sealer) -> None:
    blob = bytearray(sealer.seal(PLAINTEXT, b"ctx"))
    blob[5] = ord("Z")
    with pytest.raises(IntegrityError, match="unknown data key 'Z"):
        sealer.open(bytes(blob), b"ctx")


def test_every_single_flipped_byte_raises_integrity_error(sealer: Sealer) -> None:
    blob = sealer.seal(PLAINTEXT, b"ctx")
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0xFF
        with pytest.raises(IntegrityError):
            sealer.open(bytes(damaged), b"ctx")


@pytest.mark.parametrize("keep", [0, 3, 4, 20, -1])
def test_truncated_blob_raises_integrity_error(sealer: Sealer, keep: int) -> None:
    blob = sealer.seal(PLAINTEXT, b"ctx")
    with pytest.raises(IntegrityError):
        sealer.open(blob[:keep], b"ctx")


def test_blob_cut_inside_the_header_is_reported_as_truncated(sealer: Sealer) -> None:
    blob = sealer.seal(PLAINTEXT, b"ctx")
    start = 5 + blob[4] + NONCE_BYTES
    with pytest.raises(IntegrityError, match="truncated"):
        sealer.open(blob[: start + TAG_BYTES - 1], b"ctx")


def test_blob_from_another_key_file_does_not_open(tmp_path: Path, sealer: Sealer) -> None:
    other = Sealer(KeyStore.open(tmp_path / "other.json"))
    with pytest.raises(IntegrityError, match="unknown data key"):
        other.open(sealer.seal(PLAINTEXT, b"ctx"), b"ctx")


# --- the key file -------------------------------------------------------------------------


def test_key_store_creates_the_key_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "keys.json"
    store = KeyStore.open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == 1
    assert doc["current"] == store.current
    assert [k["id"] for k in doc["data_keys"]] == [store.current]
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"]  # no temporary left


def create_key_file(path: str, start: Any) -> str:
    """In a process of its own: wait for the others, then open (create) the key file."""
    start.wait()
    store = KeyStore.open(Path(path))
    return f"{store.current} {store.index_key.hex()}"


def test_processes_creating_the_key_file_at_once_all_use_the_same_keys(tmp_path: Path) -> None:
    # an ingest and a worker node started together on an empty shared volume: each saw no
    # key file and made one; the last to write won on disk, and whatever the others sealed
    # in the meantime could never be opened again
    path = tmp_path / "shared" / "keys.json"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(6)
        with ctx.Pool(6) as pool:
            seen = pool.starmap(create_key_file, [(str(path), start)] * 6)
    on_disk = KeyStore.open(path, create=False)
    assert set(seen) == {f"{on_disk.current} {on_disk.index_key.hex()}"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"]


def test_where_hard_links_are_not_allowed_the_key_file_is_still_created_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # some FUSE and SMB mounts

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "keys.json"
    first = KeyStore.open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyStore._create(path)  # a second process that also saw no file
    assert (again.current, again.index_key) == (first.current, first.index_key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_a_key_file_created_meanwhile_by_another_process_is_used_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    theirs = KeyStore.open(path)
    blob = Sealer(theirs).seal(PLAINTEXT, b"ctx")
    # this process looked (once) before the other created the file: it saw none
    real_exists, looked = Path.exists, list[Path]()

    def exists(p: Path) -> bool:
        if p == path and not looked:
            looked.append(p)
            return False
        return real_exists(p)

    monkeypatch.setattr(Path, "exists", exists)
    ours = KeyStore.open(path)
    assert (ours.current, ours.index_key) == (theirs.current, theirs.index_key)
    assert Sealer(ours).open(blob, b"ctx") == PLAINTEXT


def test_key_store_refuses_a_missing_file_when_not_creating(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(KeyStoreError, match="does not exist"):
        KeyStore.open(path, create=False)
    assert not path.exists()


def test_key_store_refuses_a_group_or_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyStore.open(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError) as info:
        KeyStore.open(path)
    assert info.value.message == (
        f"encryption key file '{path}' has mode 644; it must be readable by the "
        f"gateway's user only (chmod 600 '{path}')"
    )


def test_key_store_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(KeyStoreError, match="is unreadable or corrupt"):
        KeyStore.open(path)


def test_key_store_refuses_a_file_whose_current_key_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyStore.open(path)
    doc = json.loads(path.read_text())
    doc["current"] = "k-nonexistent"
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyStoreError, match="current key is missing"):
        KeyStore.open(path)


def test_reopened_key_store_decrypts_what_the_first_one_sealed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    blob = Sealer(KeyStore.open(path)).seal(PLAINTEXT, b"ctx")
    assert Sealer(KeyStore.open(path, create=False)).open(blob, b"ctx") == PLAINTEXT


def test_rotate_keeps_old_blobs_readable_and_seals_new_ones_with_the_new_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.json"
    store = KeyStore.open(path)
    old_id = store.current
    sealer = Sealer(store)
    old_blob = sealer.seal(b"before", b"a")

    new = store.rotate()
    new_blob = sealer.seal(b"after", b"b")

    assert new.key_id != old_id
    assert store.current == new.key_id
    assert store.key_ids == [old_id, new.key_id]
    assert header_key_id(old_blob) == old_id
    assert header_key_id(new_blob) == new.key_id

    reopened = Sealer(KeyStore.open(path, create=False))
    assert reopened.keys.current == new.key_id
    assert reopened.open(old_blob, b"a") == b"before"
    assert reopened.open(new_blob, b"b") == b"after"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_holds_wrapped_keys_not_the_raw_data_keys(keys: KeyStore) -> None:
    raw = keys.path.read_bytes()
    data_key = keys.current_key().key
    assert data_key not in raw
    assert base64.b64encode(data_key) not in raw


def test_index_is_stable_across_reopen_and_differs_per_input(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first = KeyStore.open(path)
    h = first.index("dicom", "1.2.840.1")
    first.rotate()  # rotation must not change the identifier hashes
    second = KeyStore.open(path)
    assert second.index("dicom", "1.2.840.1") == h
    assert len(h) == 32 and int(h, 16) >= 0
    assert second.index("dicom", "1.2.840.2") != h
    assert second.index("hl7", "1.2.840.1") != h
    # parts are separated, so ("ab", "c") and ("a", "bc") differ
    assert second.index("ab", "c") != second.index("a", "bc")


def test_index_differs_between_key_files(tmp_path: Path) -> None:
    a = KeyStore.open(tmp_path / "a.json")
    b = KeyStore.open(tmp_path / "b.json")
    assert a.index("dicom", "1.2.3") != b.index("dicom", "1.2.3")


# --- spool --------------------------------------------------------------------------------


def test_spool_put_then_get_round_trips(tmp_path: Path, sealer: Sealer) -> None:
    spool = Spool(tmp_path / "spool", sealer)
    key = spool.put(PLAINTEXT)
    assert spool.exists(key)
    assert spool.get(key) == PLAINTEXT


def test_spool_put_file_streams_in_chunks_and_get_returns_the_file_bytes(
    tmp_path: Path, sealer: Sealer
) -> None:
    if not hasattr(Spool, "put_file"):
        pytest.skip("Spool.put_file not present in this version")
    source = tmp_path / "big.dcm"
    source.write_bytes(PLAINTEXT * 3)
    spool = Spool(tmp_path / "spool", sealer)
    key = spool.put_file(source, chunk=7)
    assert spool.get(key) == PLAINTEXT * 3
    assert PLAINTEXT not in spool.path_for(key).read_bytes()


def test_spool_file_does_not_contain_the_plaintext(tmp_path: Path, sealer: Sealer) -> None:
    spool = Spool(tmp_path / "spool", sealer)
    key = spool.put(PLAINTEXT)
    raw = spool.path_for(key).read_bytes()
    assert raw.startswith(MAGIC)
    assert PLAINTEXT not in raw
    assert b"DOE^JANE" not in raw
    assert stat.S_IMODE(spool.path_for(key).stat().st_mode) == 0o600


def test_spool_keys_are_hour_prefixed_and_never_reused(tmp_path: Path, sealer: Sealer) -> None:
    spool = Spool(tmp_path / "spool", sealer)
    k1, k2 = spool.put(b"a"), spool.put(b"a")
    assert k1 != k2
    assert spool.path_for(k1) == tmp_path / "spool" / k1[:8] / k1[8:10] / f"{k1}.blob"
    assert Spool.new_key(0.0).startswith("1970010100-")


def test_spool_blob_renamed_to_another_key_fails_authentication(
    tmp_path: Path, sealer: Sealer
) -> None:
    spool = Spool(tmp_path / "spool", sealer)
    a, b = spool.put(b"first"), spool.put(b"second")
    spool.path_for(b).write_bytes(spool.path_for(a).read_bytes())
    with pytest.raises(IntegrityError, match="failed authentication"):
        spool.get(b)


def test_spool_get_of_a_missing_object_raises_integrity_error(
    tmp_path: Path, sealer: Sealer
) -> None:
    spool = Spool(tmp_path / "spool", sealer)
    key = spool.put(b"x")
    spool.discard(key)
    assert not spool.exists(key)
    with pytest.raises(IntegrityError, match=f"spool object {key} is missing"):
        spool.get(key)


# --- store --------------------------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True], ids=["in the row", "in the spool"])
def test_ingesting_the_same_sop_instance_twice_stores_one_blob(
    tmp_path: Path, large: bool
) -> None:
    """A small instance is sealed into its queue row (no spool file), a larger one is a
    spool file; either way a resend stores nothing."""
    store = Store(tmp_path / "data", tmp_path / "data" / "keys.json")
    original = PLAINTEXT * (INLINE_MAX_BYTES // len(PLAINTEXT) + 1) if large else PLAINTEXT
    try:

        def ingest(data: bytes, now: float) -> Ack:
            return store.ingest_instance(
                data,
                sop_instance_uid="1.2.3.4",
                study_instance_uid="1.2.3",
                attrs={"Modality": "CT"},
                source="PACS@127.0.0.1",
                quiet=5.0,
                now=now,
            )

        first = ingest(original, 100.0)
        second = ingest(b"other bytes", 101.0)
        assert (first.new, second.new) == (True, False)
        assert second.envelope_id == first.envelope_id
        spool = tmp_path / "data" / "spool"
        # (the spool creates empty files ahead; only written ones hold objects)
        blobs = [p for p in spool.rglob("*") if p.is_file() and p.stat().st_size]
        assert len(blobs) == (1 if large else 0)
        sealed = store.sealed_instance(first.envelope_id)
        assert (sealed is None) == large
        assert sealed is None or PLAINTEXT not in sealed
        env, data = store.read(first.envelope_id)
        assert data == original
        assert (env.spool_key is not None) == large
        assert store.attrs(first.envelope_id) == {"Modality": "CT"}
        assert store.find_instance("1.2.3.4") == first.envelope_id
        assert env.study_key == store.keys.index("study", "1.2.3")
        # the resend restarted the study's quiet period: due 5 s after it, not the first
        study = store.queue.study(env.study_key)
        assert study is not None and study.complete_due == 106.0
    finally:
        store.close()


def test_a_complete_study_sent_again_is_reopened_to_be_processed_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", tmp_path / "data" / "keys.json")
    try:
        for uid in ("1.2.3.1", "1.2.3.2"):
            store.ingest_instance(
                PLAINTEXT,
                sop_instance_uid=uid,
                study_instance_uid="1.2.3",
                attrs={},
                source="PACS@127.0.0.1",
                quiet=5.0,
                now=100.0,
            )
        key = store.keys.index("study", "1.2.3")
        assert store.queue.complete_due_studies(106.0) == [key]
        before = store.queue.study(key)
        assert before is not None and before.state == "complete"
        ack = store.ingest_instance(
            PLAINTEXT,
            sop_instance_uid="1.2.3.1",
            study_instance_uid="1.2.3",
            attrs={},
            source="PACS@127.0.0.1",
            quiet=5.0,
            now=200.0,
        )
        assert not ack.new
        after = store.queue.study(key)
        assert after is not None
        assert (after.state, after.complete_due, after.generation) == (
            "open",
            205.0,
            before.generation + 1,
        )
        assert store.queue.complete_due_studies(205.0) == [key]  # routed again
        assert len(store.queue.study_envelopes(key)) == 2  # nothing stored twice
    finally:
        store.close()


def test_store_keeps_hl7_messages_encrypted_in_the_queue_database(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", tmp_path / "keys.json")
    raw = b"MSH|^~\\&|EHR|HOSP|||20240101||ORU^R01|C1|P|2.5\rPID|1||MRN777||DOE^JANE\r"
    try:
        ack = store.ingest_message(
            raw,
            sender=("EHR", "HOSP"),
            control_id="C1",
            attrs={"MSH-9": "ORU^R01"},
            source="EHR@127.0.0.1",
            build_ack=lambda env_id: f"ACK|{env_id}".encode(),
        )
        assert store.read(ack.envelope_id)[1] == raw
        assert store.find_message("EHR", "HOSP", "C1") == ack.envelope_id
        assert ack.ack == f"ACK|{ack.envelope_id}".encode()
        resent = store.ingest_message(
            raw,
            sender=("EHR", "HOSP"),
            control_id="C1",
            attrs={"MSH-9": "ORU^R01"},
            source="EHR@127.0.0.1",
            build_ack=lambda env_id: b"never stored",
        )
        assert (resent.new, resent.ack) == (False, ack.ack)  # the first copy's ACK
    finally:
        store.close()
    db = (tmp_path / "data" / "queue.sqlite3").read_bytes()
    wal = tmp_path / "data" / "queue.sqlite3-wal"
    everything = db + (wal.read_bytes() if wal.exists() else b"")
    assert b"DOE^JANE" not in everything
    assert b"MRN777" not in everything
    assert b"ACK|" not in everything  # the ACK is sealed too


def test_an_ack_stored_in_clear_by_an_older_version_is_still_answered(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", tmp_path / "keys.json")

    def send(ack: bytes) -> Ack:
        return store.ingest_message(
            b"MSH|^~\\&|EHR|HOSP|||20240101||ADT^A01|C2|P|2.5\r",
            sender=("EHR", "HOSP"),
            control_id="C2",
            attrs={},
            source="EHR@127.0.0.1",
            build_ack=lambda env_id: ack,
        )

    try:
        first = send(b"ACK-OLD")
        store.queue._db.execute(
            "UPDATE envelopes SET ack = ? WHERE id = ?", (b"ACK-OLD", first.envelope_id)
        )
        assert send(b"new").ack == b"ACK-OLD"
    finally:
        store.close()


def test_spool_writes_into_files_created_ahead_and_removes_the_unused_on_close(
    tmp_path: Path,
) -> None:
    from gateway.store.spool import POOL_BATCH

    spool = Spool(tmp_path / "spool", Sealer(KeyStore.open(tmp_path / "keys.json")))
    keys = [spool.put(f"object {i}".encode()) for i in range(POOL_BATCH + 3)]
    files = [p for p in (tmp_path / "spool").rglob("*.blob")]
    assert len(files) == 2 * POOL_BATCH  # two batches created ahead
    assert [spool.get(k) for k in keys] == [f"object {i}".encode() for i in range(POOL_BATCH + 3)]
    spool.close()
    left = sorted(p.name for p in (tmp_path / "spool").rglob("*.blob"))
    assert left == sorted(f"{k}.blob" for k in keys)  # written objects stay, spares go
    reader = Spool(tmp_path / "spool", spool.sealer, pool=False)
    assert reader.get(keys[0]) == b"object 0"
    assert len(list((tmp_path / "spool").rglob("*.blob"))) == len(keys)
