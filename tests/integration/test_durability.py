"""Guarantees under failure: kill -9 mid-stream, a full disk, and no PHI in logs or at rest."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from gateway.store.store import Store
from tests.dicomgen import SeriesSpec, dataset_bytes, dcmtk_env, make_study, storescu_args
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01, send_mllp


def _send_until_killed(
    port: int, files: list[Path], acked: list[Path], stop: threading.Event
) -> None:
    """A pynetdicom SCU that records exactly which instances got 0x0000."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for f in files[:1]:
        meta = dcmread(f, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    if not assoc.is_established:
        return
    try:
        for f in files:
            if stop.is_set():
                break
            rsp = assoc.send_c_store(dcmread(f))
            if rsp is None or "Status" not in rsp:
                break  # connection gone: the gateway was killed
            if rsp.Status == 0x0000:
                acked.append(f)
    finally:
        with contextlib.suppress(Exception):
            assoc.abort()


@pytest.mark.slow
def test_kill9_mid_stream_loses_no_acknowledged_instance_or_message(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=120, rows=256, cols=256)])
    acked: list[Path] = []
    stop = threading.Event()
    sender = threading.Thread(target=_send_until_killed, args=(gw.dicom_port, files, acked, stop))

    # HL7 messages acknowledged before the kill
    hl7_acked: list[tuple[str, bytes]] = []
    for i in range(20):
        msg = oru_r01(control_id=f"KILL{i:04d}")
        ack = send_mllp(gw.hl7_port, [msg])[0]
        if b"MSA|AA|" in ack:
            hl7_acked.append((f"KILL{i:04d}", msg))
    assert len(hl7_acked) == 20

    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    gw.kill9()  # mid-stream: the SCU is still sending
    stop.set()
    sender.join(timeout=30)
    assert 30 <= len(acked) < len(files), "the kill should land mid-stream"

    gw.start()  # restart on the same data: recovery must not lose or corrupt anything
    gw.stop()
    store = Store(gw.data_dir, gw.key_file, create=False)
    try:
        for f in acked:
            original = f.read_bytes()
            envelope_id = store.find_instance(
                str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            )
            assert envelope_id is not None, f"acknowledged {f.name} was lost"
            _, data = store.read(envelope_id)
            assert dcmread(__import__("io").BytesIO(data)).PixelData == dcmread(f).PixelData
            assert len(dataset_bytes(data)) > 0 and len(original) > 0
        for control_id, msg in hl7_acked:
            envelope_id = store.find_message("EHR", "HOSP", control_id)
            assert envelope_id is not None, f"acknowledged message {control_id} was lost"
            assert store.read(envelope_id)[1] == msg
    finally:
        store.close()


@contextlib.contextmanager
def tiny_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the filesystem under *path* completely; return the filler file."""
    filler = path / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):  # big writes, then the last few bytes
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_answers_a700_and_ae_then_recovers_by_itself(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "small", 24) as small:
        cfg = write_config(
            tmp_path,
            gateway={
                "data_dir": str(small / "var"),
                "encryption_key_file": str(tmp_path / "keys.json"),
                # no free-space floor: this drill is about the write that fails (the
                # floor is drilled in test_faults.py)
                "min_free_mb": 0,
            },
        )
        gw = GatewayProcess(cfg, tmp_path / "gateway.log").start()
        try:
            files = make_study(
                tmp_path / "s", series=[SeriesSpec("CT", count=2, rows=256, cols=256)]
            )
            filler = fill(small)

            r = subprocess.run(
                storescu_args(files[:1], port=gw.dicom_port, aet="STORESCU", extra=["-v"]),
                capture_output=True,
                text=True,
                env=dcmtk_env(),
                timeout=60,
            )
            assert r.returncode != 0
            out = (r.stdout + r.stderr).lower()
            assert "refused: outofresources" in out, out  # dcmtk's name for 0xA7xx
            ack = send_mllp(gw.hl7_port, [oru_r01(control_id="FULL0001")])[0]
            assert b"MSA|AE|FULL0001" in ack
            assert b"ERR|" in ack
            assert gw.get("/healthz")[0] == 200  # still running

            filler.unlink()  # space returns: no restart, no operator action
            r = subprocess.run(
                storescu_args(files, port=gw.dicom_port, aet="STORESCU"),
                capture_output=True,
                text=True,
                env=dcmtk_env(),
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            ack = send_mllp(gw.hl7_port, [oru_r01(control_id="FULL0001")])[0]
            assert b"MSA|AA|FULL0001" in ack
            status = json.loads(gw.cli("queue", "status", "--json").stdout)
            assert status["received"] == {"dicom": 2, "hl7": 1}
            _, body = gw.get("/metrics")
            assert b"gateway_spool_errors_total" in body
        finally:
            gw.stop()


PHI = ["DOE^JANE", "PID12345", "ACC0001", "19700101", "SMITH^JOHN", "MRN998877", "Left lung mass"]


def test_no_phi_in_logs_or_in_plaintext_at_rest(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    try:
        files = make_study(
            tmp_path / "s",
            patient_name="DOE^JANE",
            patient_id="PID12345",
            accession="ACC0001",
            series=[SeriesSpec("CT", count=3, rows=64, cols=64)],
        )
        for f in files:  # a birth date too
            ds = dcmread(f)
            ds.PatientBirthDate = "19700101"
            ds.save_as(f)
        r = subprocess.run(
            storescu_args(files, port=gw.dicom_port, aet="STORESCU"),
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        ack = send_mllp(
            gw.hl7_port,
            [
                oru_r01(
                    control_id="PHI0001",
                    patient="SMITH^JOHN",
                    mrn="MRN998877",
                    text="Left lung mass",
                )
            ],
        )[0]
        assert b"MSA|AA|" in ack
        # a refused message and a refused association log too: still no PHI
        send_mllp(
            gw.hl7_port,
            [
                oru_r01(
                    control_id="PHI0002", patient="SMITH^JOHN", mrn="MRN998877", sender="UNKNOWN"
                )
            ],
        )
    finally:
        gw.stop()
    log = gw.log()
    assert "dicom.association.released" in log and "hl7.message.stored" in log
    for value in PHI:
        assert value not in log, f"{value!r} appears in the log"
    for root, _, names in os.walk(gw.data_dir):
        for name in names:
            blob = (Path(root) / name).read_bytes()
            for value in PHI:
                assert value.encode() not in blob, f"{value!r} in plaintext in {name}"


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    with socket.create_connection(("127.0.0.1", gw.hl7_port)):
        pass
    assert gw.stop() == 0
    assert "gateway.stopped" in gw.log()
