"""DICOM association limits and responsiveness, against the real gateway process:
``dicom.max_associations`` rejects the next association as a transient local limit, and the
SCP keeps answering C-ECHO while another association is in the middle of a 64 MiB C-STORE."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import Verification

from tests.dicomgen import dcmtk_env, make_large_instance
from tests.gatewayproc import GatewayProcess, write_config

pytestmark = pytest.mark.timeout(180)

# PS3.8 9.3.4 A-ASSOCIATE-RJ: result 2 = rejected-transient; source 3 = service-provider
# (presentation related function); diagnostic 2 = local-limit-exceeded.
REJECTED_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        write_config(tmp_path, dicom={"max_associations": 2}), tmp_path / "gateway.log"
    ).start()
    yield gw
    gw.stop()


def associate(gw: GatewayProcess, ae_title: str = "PACS") -> Association:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", gw.dicom_port, ae_title="AI_GATEWAY")


def metric(gw: GatewayProcess, name: str, labels: str = "") -> float:
    code, body = gw.get("/metrics")
    assert code == 200
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    found = re.search(pattern, body.decode(), re.MULTILINE)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


def events(gw: GatewayProcess, words: str) -> list[dict[str, Any]]:
    """Log events named like *words* (dotted names or plain sentences both match)."""
    return [
        e
        for e in gw.log_events()
        if words in str(e.get("event", "")).replace(".", " ").replace("_", " ")
    ]


def echo(gw: GatewayProcess, timeout: float = 10) -> tuple[int, float, str]:
    started = time.monotonic()
    r = subprocess.run(
        [
            "echoscu",
            "-to",
            "5",
            "-ta",
            "5",
            "-td",
            "5",
            "-aet",
            "ECHOSCU",
            "-aec",
            "AI_GATEWAY",
            "127.0.0.1",
            str(gw.dicom_port),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout,
    )
    return r.returncode, time.monotonic() - started, r.stdout + r.stderr


def test_association_beyond_max_associations_is_rejected_transient_local_limit(
    gateway: GatewayProcess,
) -> None:
    held = [associate(gateway), associate(gateway)]
    try:
        assert all(a.is_established for a in held)
        assert metric(gateway, "gateway_dicom_active_associations") == 2

        third = associate(gateway)
        assert third.is_rejected
        assert not third.is_established
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (
            REJECTED_TRANSIENT,
            SOURCE_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
        ), (rj.result_str, rj.source_str, rj.reason_str)
        assert rj.reason_str == "Local limit exceeded"

        # the held associations are unaffected
        assert all(a.send_c_echo().Status == 0x0000 for a in held)
    finally:
        held[0].release()

    try:
        # once one is released, there is room again (its thread may take a moment to end)
        deadline = time.monotonic() + 10
        retries = 0
        while True:
            fourth = associate(gateway)
            if fourth.is_established or time.monotonic() > deadline:
                break
            retries += 1
            time.sleep(0.2)
        assert fourth.is_established
        assert fourth.send_c_echo().Status == 0x0000
        fourth.release()
    finally:
        held[1].release()

    # the third, and any retry above that came before the released association's thread
    # had ended (the loop's reason to exist)
    rejected = events(gateway, "association rejected")
    assert 1 <= len(rejected) == 1 + retries, rejected
    assert rejected[0]["calling_ae"] == "PACS"
    assert rejected[0]["peer"] == "127.0.0.1"
    assert rejected[0]["level"] == "warning"
    assert metric(gateway, "gateway_dicom_associations_total", '{outcome="rejected"}') == len(
        rejected
    )


def test_connections_closed_before_a_request_do_not_hold_association_slots(
    gateway: GatewayProcess,
) -> None:
    """A port scanner or a load balancer's health check connects and closes without an
    A-ASSOCIATE-RQ.  Five of those against max_associations 2: the next peer is served at
    once, not after pynetdicom's 30 s acse_timeout."""
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gateway.dicom_port), timeout=5):
            pass
    time.sleep(0.5)  # the gateway has seen every connection close
    assoc = associate(gateway)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_dcmtk_beyond_max_associations_is_told_local_limit_exceeded(
    gateway: GatewayProcess,
) -> None:
    held = [associate(gateway), associate(gateway)]
    try:
        assert all(a.is_established for a in held)
        code, _, output = echo(gateway)
        assert code != 0
        assert "Local Limit Exceeded" in output or "local-limit-exceeded" in output, output
        assert "Transient" in output or "transient" in output, output
    finally:
        for a in held:
            a.release()
    deadline = time.monotonic() + 10
    while (code := echo(gateway)[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert code == 0


class PausingSend:
    """Wraps an association's socket send: once *after* bytes have gone out, the sender
    stops (mid-PDU stream, mid data set) until :meth:`resume`."""

    def __init__(self, assoc: Association, after: int) -> None:
        self.sock = assoc.dul.socket
        self.original = self.sock.send
        self.after = after
        self.sent = 0
        self.paused = threading.Event()
        self.resumed = threading.Event()
        self.sock.send = self  # instance attribute shadows AssociationSocket.send

    def __call__(self, data: bytes) -> None:
        if self.sent >= self.after and not self.resumed.is_set():
            self.paused.set()
            self.resumed.wait(60)
        self.sent += len(data)
        self.original(data)

    def resume(self) -> None:
        self.resumed.set()


def test_echo_is_answered_while_another_association_is_mid_way_through_a_64mb_store(
    gateway: GatewayProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = make_large_instance(tmp_path / "large", megabytes=64)
    assert big.stat().st_size > 64 * 1024 * 1024
    # The gateway offers an unlimited PDU size (dicom.max_pdu: 0), so pynetdicom would send
    # the whole data set as one 64 MiB P-DATA PDU; send 64 KiB PDUs, as a PACS would.
    monkeypatch.setattr(DIMSEServiceProvider, "maximum_pdu_size", property(lambda _: 65536))

    ae = AE(ae_title="PACS")
    ae.add_requested_context(
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage, ExplicitVRLittleEndian
    )
    ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", gateway.dicom_port, ae_title="AI_GATEWAY")
    assert assoc.is_established
    pause = PausingSend(assoc, after=16 * 1024 * 1024)
    result: dict[str, Any] = {}

    def store() -> None:
        # stream the file from disk as it is (no decode, no 64 MiB copy in memory)
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            result["status"] = int(assoc.send_c_store(big).Status)
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before

    sender = threading.Thread(target=store, name="big-store", daemon=True)
    sender.start()
    try:
        assert pause.paused.wait(60), "the sender never got 16 MiB out"
        # the store is in flight: 16 MiB sent, the rest held back
        assert sender.is_alive()
        paused_echoes = [echo(gateway) for _ in range(3)]
        assert [c for c, _, _ in paused_echoes] == [0, 0, 0], paused_echoes
        assert max(t for _, t, _ in paused_echoes) < 2.0, paused_echoes
        assert metric(gateway, "gateway_dicom_active_associations") == 1
    finally:
        pause.resume()

    # and while the remaining 48 MiB flow and the instance is encrypted and fsync'd
    flowing_echoes = []
    while sender.is_alive():
        flowing_echoes.append(echo(gateway))
    sender.join(120)
    assoc.release()
    assert result.get("status") == 0x0000, result
    assert flowing_echoes, "the store finished before a single echo could start"
    assert all(c == 0 for c, _, _ in flowing_echoes), flowing_echoes
    assert all(t < 5.0 for _, t, _ in flowing_echoes), flowing_echoes

    status = json.loads(gateway.cli("queue", "status", "--json").stdout)
    assert status["received"]["dicom"] == 1
    assert metric(gateway, "gateway_dicom_bytes_received_total") > 64 * 1024 * 1024
