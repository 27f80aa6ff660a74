"""Retention on the running gateway, and `gateway purge`, as an operator uses them.

Studies and messages are forwarded to a dcmtk storescp and an MLLP sink; once delivered and
older than the retention, the gateway deletes them, their spool files and queue rows, and
says so in the audit trail.  A study sent again afterwards is received and forwarded again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.dicomgen import (
    SeriesSpec,
    dcmtk_env,
    free_port,
    make_study,
    storescp_args,
    wait_for_port,
)
from tests.gatewayproc import GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Path, int, MLLPSink]]:
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        [*storescp_args(received, port=port), "+uf"],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    with MLLPSink() as sink:
        yield received, port, sink
    scp.terminate()
    scp.wait(timeout=10)


def forwarding_gateway(
    folder: Path, pacs_port: int, sink: MLLPSink, **gateway: Any
) -> GatewayProcess:
    config = write_config(
        folder,
        gateway={"retention_days": None, **gateway},
        dicom={"study_complete_after": 0.5},
        destinations={
            "pacs": {"dicom": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}},
            "ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}},
        },
        routes=[
            {"name": "images", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]},
            {"name": "reports", "when": {"hl7": {"MSH-9": "ORU^R01"}}, "forward": ["ehr"]},
        ],
    )
    return GatewayProcess(config, folder / "gateway.log")


def all_delivered(gw: GatewayProcess) -> bool:
    s = gw.queue_status()
    return s.get("jobs:deliver") == {"done": 2} and s.get("jobs:route") == {"done": 2}


def spool_blobs(gw: GatewayProcess) -> list[Path]:
    """The spool files that hold an object (the studies here are 192 x 192 x 16 bit, above
    INLINE_MAX_BYTES: their instances are spool files, not row values)."""
    return [p for p in (gw.data_dir / "spool").rglob("*.blob") if p.stat().st_size]


def test_the_running_gateway_deletes_what_it_delivered_once_retention_has_passed(
    tmp_path: Path, peers: tuple[Path, int, MLLPSink]
) -> None:
    received, pacs_port, sink = peers
    paths = make_study(tmp_path / "ct", series=[SeriesSpec("CT", count=3, rows=192, cols=192)])
    study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    # 0.0001 days = 8.6 s: the gateway checks every 2.2 s at that retention
    gw = forwarding_gateway(tmp_path, pacs_port, sink, retention_days=0.0001).start()
    try:
        gw.send_study(paths)
        (ack,) = send_mllp(gw.hl7_port, [oru_r01(control_id="RET00001")])
        assert b"MSA|AA|RET00001" in ack
        wait_until("both deliveries", lambda: all_delivered(gw))
        assert len(list(received.iterdir())) == 3 and len(sink.received) == 1
        assert spool_blobs(gw)

        wait_until("the retention pass", lambda: gw.queue_status().get("jobs:route") is None, 60)
        assert not spool_blobs(gw)
        deleted = gw.audit_records("data-deleted")
        assert deleted and {"type": "study", "id": study_uid} in deleted[0]["objects"]
        metrics = gw.get("/metrics")[1].decode()
        assert 'gateway_purged_total{kind="study"} 1.0' in metrics
        assert 'gateway_purged_total{kind="message"} 1.0' in metrics

        # the study is new to the gateway again: received and forwarded again
        for f in received.iterdir():
            f.unlink()
        gw.send_study(paths)
        wait_until("the resend at the PACS", lambda: len(list(received.iterdir())) == 3)
    finally:
        gw.stop()
    assert gw.cli("audit", "verify").returncode == 0


def test_gateway_purge_counts_first_then_deletes_and_keeps_dead_letters(
    tmp_path: Path, peers: tuple[Path, int, MLLPSink]
) -> None:
    _, pacs_port, sink = peers
    paths = make_study(tmp_path / "ct", series=[SeriesSpec("CT", count=2, rows=192, cols=192)])
    gw = forwarding_gateway(tmp_path, pacs_port, sink).start()
    try:
        gw.send_study(paths)
        send_mllp(gw.hl7_port, [oru_r01(control_id="RET00002")])
        wait_until("both deliveries", lambda: all_delivered(gw))
        sink.reply = "AR"  # the EHR refuses the next one: a dead letter
        send_mllp(gw.hl7_port, [oru_r01(control_id="RET00003")])
        wait_until("the dead letter", lambda: gw.queue_status().get("jobs:deliver", {}).get("dead"))

        dry = gw.cli("purge", "--older-than", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would delete: 1 studies and 1 messages" in dry.stdout
        assert "kept: 1 old enough but with a job waiting, running or dead" in dry.stdout
        assert gw.queue_status()["jobs:route"] == {"done": 3}

        done = gw.cli("purge", "--older-than", "0", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["studies"], report["messages"], report["kept"]) == (1, 1, 1)
        assert report["envelopes"] == 3 and report["spool_files"] >= 2
        assert gw.queue_status()["jobs:route"] == {"done": 1}  # the dead letter's message stays
        assert len(spool_blobs(gw)) == 0  # HL7 messages live in their rows, not the spool
    finally:
        gw.stop()
    assert gw.cli("audit", "verify").returncode == 0
    assert gw.audit_records("data-deleted")


def test_purge_without_a_retention_says_what_to_set(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "purge", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "set gateway.retention_days" in r.stderr and "--older-than DAYS" in r.stderr
