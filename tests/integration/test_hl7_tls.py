"""MLLP over TLS against the real gateway process: every way a peer can get TLS wrong is
refused at the handshake, written to the audit trail as a security alert, and leaves the
listener serving the next, good client.  The mirror of tests/integration/test_dicom_tls.py.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.certs import PKI, issue, make_pki
from tests.dicomgen import free_port
from tests.gatewayproc import GatewayProcess, write_config
from tests.hl7msgs import oru_r01
from tests.integration.test_dicom_tls import (
    _legacy_client,
    _legacy_tls_available,
    dcmtk_tls,
    echoscu,
    tls_refusal,
)

pytestmark = pytest.mark.timeout(120)

START, END = b"\x0b", b"\x1c\r"


@dataclass
class TLSListener:
    gw: GatewayProcess
    pki: PKI
    other: PKI
    port: int

    def alerts(self) -> list[dict[str, Any]]:
        return self.gw.audit_records("security-alert")

    def wait_alert(self, before: int) -> dict[str, Any]:
        return self.gw.wait_audit("security-alert", before)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSListener]:
    folder = tmp_path_factory.mktemp("hl7-tls")
    pki = make_pki(folder / "pki")
    other = make_pki(folder / "other", prefix="other-")
    port = free_port()
    config = write_config(
        folder,
        hl7={
            "tls": {
                "port": port,
                "cert": str(pki.server_cert),
                "key": str(pki.server_key),
                "ca": str(pki.ca_cert),
                "require_client_cert": True,
            }
        },
        # every refusal written: the tests here read each one's reason, often the same one
        # twice within a minute (repeats are folded by default: test_audit_trail.py)
        gateway={"audit": {"repeat_window": 0}},
    )
    gw = GatewayProcess(config, folder / "gateway.log").start()
    try:
        yield TLSListener(gw, pki, other, port)
    finally:
        gw.stop()


def send_over_tls(port: int, ctx: ssl.SSLContext, message: bytes) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(START + message + END)
        reply = b""
        while not reply.endswith(END):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def assert_refused_and_audited(listener: TLSListener, ctx: ssl.SSLContext) -> str:
    """Returns the audit record's detail.  The peer sees its connection closed (asyncio
    sends no TLS alert for a failed server handshake); the gateway's log and audit trail
    say why."""
    before = len(listener.alerts())
    reason = tls_refusal(listener.port, ctx)
    assert reason != "accepted", "the gateway accepted the handshake"
    alert = listener.wait_alert(before)
    assert alert["outcome"] == "minor-failure"
    assert alert["actor"]["host"] == "127.0.0.1"
    assert alert["detail"].startswith("MLLP TLS handshake refused")
    # and the listener serves a good client right after
    ack = send_over_tls(listener.port, listener.pki.client_context(), oru_r01(control_id="OK1"))
    assert b"MSA|AA|" in ack
    return str(alert["detail"])


def test_a_good_client_gets_its_ack_over_tls(listener: TLSListener) -> None:
    ack = send_over_tls(listener.port, listener.pki.client_context(), oru_r01(control_id="TLS1"))
    assert b"MSA|AA|TLS1" in ack


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_client_without_a_certificate_is_refused(
    listener: TLSListener, version: ssl.TLSVersion
) -> None:
    ctx = listener.pki.client_context(with_cert=False)
    ctx.minimum_version = ctx.maximum_version = version
    detail = assert_refused_and_audited(listener, ctx)
    assert "CERTIFICATE" in detail, detail


def test_a_client_certificate_from_another_ca_is_refused(listener: TLSListener) -> None:
    ctx = ssl.create_default_context(cafile=str(listener.pki.ca_cert))
    ctx.load_cert_chain(listener.other.client_cert, listener.other.client_key)
    detail = assert_refused_and_audited(listener, ctx)
    assert "CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate)" in detail


def test_a_self_signed_client_certificate_is_refused(listener: TLSListener, tmp_path: Path) -> None:
    own = issue(tmp_path, "self-signed-client", client=True)  # no issuer: self-signed
    ctx = ssl.create_default_context(cafile=str(listener.pki.ca_cert))
    ctx.load_cert_chain(own.cert, own.key)
    assert "CERTIFICATE_VERIFY_FAILED" in assert_refused_and_audited(listener, ctx)


def test_an_expired_client_certificate_is_refused(listener: TLSListener, tmp_path: Path) -> None:
    expired = issue(tmp_path, "expired-client", listener.pki.ca, client=True, expired=True)
    ctx = ssl.create_default_context(cafile=str(listener.pki.ca_cert))
    ctx.load_cert_chain(expired.cert, expired.key)
    detail = assert_refused_and_audited(listener, ctx)
    assert "CERTIFICATE_VERIFY_FAILED (certificate has expired)" in detail


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(listener: TLSListener, version: ssl.TLSVersion) -> None:
    if not _legacy_tls_available(listener.pki):
        pytest.skip("this machine's OpenSSL cannot negotiate TLS 1.0/1.1 even with a willing peer")
    ctx = _legacy_client(listener.pki)
    ctx.minimum_version = ctx.maximum_version = version
    detail = assert_refused_and_audited(listener, ctx)
    assert "UNSUPPORTED_PROTOCOL" in detail or "PROTOCOL_VERSION" in detail, detail


def received(listener: TLSListener) -> int:
    return int(listener.gw.queue_status()["received"].get("hl7", 0))


def test_plain_mllp_on_the_tls_port_gets_no_ack_and_is_audited(listener: TLSListener) -> None:
    before, stored = len(listener.alerts()), received(listener)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as s:
        s.sendall(START + oru_r01(control_id="PLAIN1") + END)
        s.settimeout(10)
        try:
            reply = s.recv(65536)
        except ConnectionResetError:
            reply = b""
    assert b"MSA" not in reply
    assert "MLLP TLS handshake refused" in listener.wait_alert(before)["detail"]
    assert received(listener) == stored  # nothing was stored


def test_the_plain_ports_can_be_switched_off(tmp_path: Path) -> None:
    """dicom.port: null and hl7.port: null: the gateway listens on its TLS ports only."""
    pki = make_pki(tmp_path / "pki")
    tls = {
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "ca": str(pki.ca_cert),
        "require_client_cert": True,
    }
    dicom_tls, hl7_tls = free_port(), free_port()
    config = write_config(
        tmp_path,
        dicom={"port": None, "tls": {"port": dicom_tls, **tls}},
        hl7={"port": None, "tls": {"port": hl7_tls, **tls}},
    )
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    try:
        events = {e["event"]: e for e in gw.log_events() if str(e["event"]).endswith("listening")}
        assert events["dicom.listening"]["ports"] == [dicom_tls]
        assert events["hl7.listening"]["ports"] == {"mllp+tls": hl7_tls}
        r = echoscu(dicom_tls, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert))
        assert r.returncode == 0, r.stdout + r.stderr
        ack = send_over_tls(hl7_tls, pki.client_context(), oru_r01(control_id="TLSONLY1"))
        assert b"MSA|AA|TLSONLY1" in ack
    finally:
        gw.stop()


def test_switching_the_plain_port_off_without_tls_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, hl7={"port": None})
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "hl7.port: null switches the plain port off, which needs hl7.tls" in r.stderr
