"""Instances larger than memory should be: dicom.receive_to_disk keeps the gateway small."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.store.store import Store
from tests.dicomgen import dataset_bytes, dcmtk_env, make_large_instance, storescu_args
from tests.gatewayproc import GatewayProcess, write_config


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_300_mb_instance_is_received_to_disk_with_little_memory(tmp_path: Path) -> None:
    big = make_large_instance(tmp_path / "big", megabytes=300)
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"receive_to_disk": True}), tmp_path / "gateway.log"
    ).start()
    try:
        assert gw.proc is not None
        before = peak_rss_mb(gw.proc.pid)
        r = subprocess.run(storescu_args([big], port=gw.dicom_port, aet="STORESCU"),
                           capture_output=True, text=True, env=dcmtk_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        growth = peak_rss_mb(gw.proc.pid) - before
        assert growth < 100, f"peak RSS grew {growth:.0f} MB for a 300 MB instance"
        assert not any((gw.data_dir / "incoming").iterdir())  # the plaintext copy is gone
    finally:
        gw.stop()
    store = Store(gw.data_dir, gw.key_file, create=False)
    try:
        envelope_id = store.find_instance(str(dcmread(big, stop_before_pixels=True).SOPInstanceUID))
        assert envelope_id is not None
        _, data = store.read(envelope_id)
        assert hashlib.sha256(dataset_bytes(data)).digest() == hashlib.sha256(
            dataset_bytes(big.read_bytes())).digest()
    finally:
        store.close()


@pytest.mark.slow
def test_kill9_mid_instance_leaves_no_plaintext_behind_after_restart(tmp_path: Path) -> None:
    big = make_large_instance(tmp_path / "big", megabytes=400)
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"receive_to_disk": True}), tmp_path / "gateway.log"
    ).start()
    incoming = gw.data_dir / "incoming"
    sender = subprocess.Popen(storescu_args([big], port=gw.dicom_port, aet="STORESCU"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dcmtk_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            f.stat().st_size > 50 << 20 for f in incoming.iterdir()
        ):
            time.sleep(0.05)
        assert any(incoming.iterdir()), "the transfer never started"
        gw.kill9()
    finally:
        sender.wait(timeout=60)
    assert any(incoming.iterdir())  # the partial plaintext is there after the crash...
    gw.start()
    try:
        assert not any(incoming.iterdir())  # ...and gone once the gateway is back
        status = gw.cli("queue", "status", "--json").stdout
        assert '"dicom"' not in status  # nothing was acknowledged, nothing recorded
    finally:
        gw.stop()


def test_receive_to_disk_still_refuses_a_malformed_instance(tmp_path: Path) -> None:
    from tests.integration.test_dicom_ingest import _send_raw

    big = make_large_instance(tmp_path / "big", megabytes=1)
    raw = big.read_bytes()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw[:-1000])  # pixel data cut short
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"receive_to_disk": True}), tmp_path / "gateway.log"
    ).start()
    try:
        assert _send_raw(gw.dicom_port, bad) == 0xC210
        assert not any((gw.data_dir / "incoming").iterdir())
    finally:
        gw.stop()


def test_concurrent_large_receptions_each_complete(tmp_path: Path) -> None:
    files = [make_large_instance(tmp_path / f"b{i}", megabytes=20, seed=i) for i in range(3)]
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"receive_to_disk": True}), tmp_path / "gateway.log"
    ).start()
    results: list[int] = []
    try:
        threads = [
            threading.Thread(target=lambda f=f: results.append(subprocess.run(
                storescu_args([f], port=gw.dicom_port, aet="STORESCU"),
                capture_output=True, env=dcmtk_env(), timeout=120).returncode))
            for f in files
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0, 0, 0]
        assert '"dicom": 3' in gw.cli("queue", "status", "--json").stdout
    finally:
        gw.stop()
