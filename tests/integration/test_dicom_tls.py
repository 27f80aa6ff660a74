"""DICOM over TLS from outside: dcmtk echoscu/storescu (built with OpenSSL) and pynetdicom
against the real gateway process, with client certificates required (dicom.tls)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.certs import PKI, issue, make_pki
from tests.dicomgen import SeriesSpec, dcmtk_env, free_port, make_study, storescu_args
from tests.gatewayproc import GatewayProcess, write_config

pytestmark = pytest.mark.timeout(120)


@dataclass
class TLSGateway:
    gw: GatewayProcess
    pki: PKI  # the CA the gateway trusts, its server certificate, a good client
    other: PKI  # an unrelated CA and a client certificate it issued
    tls_port: int

    def received(self) -> int:
        r = self.gw.cli("queue", "status", "--json")
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["received"].get("dicom", 0))

    def alerts(self) -> list[dict[str, object]]:
        """The security-alert records of the gateway's audit trail."""
        return self.gw.audit_records("security-alert")

    def wait_alert(self, before: int) -> dict[str, object]:
        return self.gw.wait_audit("security-alert", before)

    def accepted_associations(self) -> int:
        return sum(1 for e in self.gw.log_events() if _is(e, "association accepted"))


def _is(event: dict[str, object], words: str) -> bool:
    """Log event names are dotted (dicom.association.accepted) or plain sentences."""
    return words in str(event.get("event", "")).replace(".", " ").replace("_", " ")


def tls_config(folder: Path, pki: PKI, tls_port: int) -> Path:
    return write_config(
        folder,
        dicom={
            "tls": {
                "port": tls_port,
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


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSGateway]:
    folder = tmp_path_factory.mktemp("dicom-tls")
    pki = make_pki(folder / "pki")
    other = make_pki(folder / "other", prefix="other-")
    tls_port = free_port()
    gw = GatewayProcess(tls_config(folder, pki, tls_port), folder / "gateway.log").start()
    try:
        yield TLSGateway(gw, pki, other, tls_port)
    finally:
        gw.stop()


def run_dcmtk(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu from ECHOSCU to AI_GATEWAY on 127.0.0.1:*port*, with *options*."""
    return run_dcmtk(
        ["echoscu", *options, "-aet", "ECHOSCU", "-aec", "AI_GATEWAY", "127.0.0.1", str(port)]
    )


def dcmtk_tls(key: Path, cert: Path, ca: Path) -> list[str]:
    """dcmtk's TLS options: present key+cert (unencrypted key: -pw), trust *ca*, verify the
    server's certificate (-rc, the default, spelled out)."""
    return ["+tls", str(key), str(cert), "-pw", "+cf", str(ca), "-rc"]


def tls_refusal(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake with *ctx* and read: the server's verdict on our certificate.

    With TLS 1.2 a refusal fails the handshake itself; with TLS 1.3 the server checks the
    client certificate after the client's Finished and its alert arrives on the first read.
    Returns the OpenSSL reason (e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED), "closed" when the
    server just hung up, or "accepted" when it waited for the DICOM A-ASSOCIATE-RQ.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.settimeout(3)
                return "closed" if s.recv(1) == b"" else "data"
        except ssl.SSLError as exc:
            return str(exc.reason)
        except TimeoutError:
            return "accepted"
        except ConnectionError:
            return "closed"


# --- the happy path: dcmtk with a client certificate --------------------------------------


def test_echoscu_over_tls_with_client_certificate_succeeds(tls_gateway: TLSGateway) -> None:
    pki = tls_gateway.pki
    accepted = tls_gateway.accepted_associations()
    r = echoscu(tls_gateway.tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert))
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 5
    while tls_gateway.accepted_associations() == accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tls_gateway.accepted_associations() == accepted + 1


def test_storescu_over_tls_with_client_certificate_stores_every_instance(
    tls_gateway: TLSGateway, tmp_path: Path
) -> None:
    pki = tls_gateway.pki
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=3, rows=64, cols=64)])
    before = tls_gateway.received()
    r = run_dcmtk(
        storescu_args(
            files,
            port=tls_gateway.tls_port,
            aet="STORESCU",
            extra=dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert),
        )
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert tls_gateway.received() == before + 3


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_pynetdicom_echo_over_tls_1_2_and_1_3_succeeds(
    tls_gateway: TLSGateway, version: ssl.TLSVersion
) -> None:
    ctx = tls_gateway.pki.client_context()
    ctx.minimum_version = ctx.maximum_version = version
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", tls_gateway.tls_port, ae_title="AI_GATEWAY", tls_args=(ctx, "localhost")
    )
    assert assoc.is_established
    try:
        tls_socket = assoc.dul.socket.socket
        assert isinstance(tls_socket, ssl.SSLSocket)
        assert tls_socket.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        assert tls_socket.getpeercert()["subject"][-1][0][1] == "server"
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused_at_the_tls_handshake(
    tls_gateway: TLSGateway, version: ssl.TLSVersion
) -> None:
    accepted = tls_gateway.accepted_associations()
    ctx = tls_gateway.pki.client_context(with_cert=False)
    ctx.minimum_version = ctx.maximum_version = version
    reason = tls_refusal(tls_gateway.tls_port, ctx)
    assert reason in {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",  # TLS 1.3
        "SSLV3_ALERT_HANDSHAKE_FAILURE",  # TLS 1.2
    }, reason
    assert tls_gateway.accepted_associations() == accepted


def test_dcmtk_anonymous_tls_is_refused_and_nothing_is_stored(
    tls_gateway: TLSGateway, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "s", series=[SeriesSpec("CT", count=1, rows=64, cols=64)])
    before = tls_gateway.received()
    r = run_dcmtk(
        storescu_args(
            files,
            port=tls_gateway.tls_port,
            aet="STORESCU",
            extra=["+tla", "+cf", str(tls_gateway.pki.ca_cert)],
        )
    )
    assert r.returncode != 0
    assert "Association Request Failed" in r.stdout + r.stderr
    assert tls_gateway.received() == before


def test_client_certificate_from_another_ca_is_refused(tls_gateway: TLSGateway) -> None:
    pki, other = tls_gateway.pki, tls_gateway.other
    accepted = tls_gateway.accepted_associations()
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))  # trusts the server...
    ctx.load_cert_chain(other.client_cert, other.client_key)  # ...but presents a stranger
    assert tls_refusal(tls_gateway.tls_port, ctx) == "TLSV1_ALERT_UNKNOWN_CA"

    r = echoscu(tls_gateway.tls_port, *dcmtk_tls(other.client_key, other.client_cert, pki.ca_cert))
    assert r.returncode != 0
    assert "Association Request Failed" in r.stdout + r.stderr
    assert tls_gateway.accepted_associations() == accepted


def test_dcmtk_refuses_a_gateway_certificate_from_an_untrusted_ca(
    tls_gateway: TLSGateway,
) -> None:
    """The other direction: a PACS that trusts only its own CA does not talk to us."""
    pki, other = tls_gateway.pki, tls_gateway.other
    r = echoscu(tls_gateway.tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, other.ca_cert))
    assert r.returncode != 0
    assert "certificate verify failed" in r.stdout + r.stderr


def test_plain_dicom_on_the_tls_port_is_refused(tls_gateway: TLSGateway) -> None:
    accepted = tls_gateway.accepted_associations()
    r = echoscu(tls_gateway.tls_port, "-to", "5", "-ta", "5")
    assert r.returncode != 0
    assert "Association Request Failed" in r.stdout + r.stderr
    assert tls_gateway.accepted_associations() == accepted


def _legacy_tls_available(pki: PKI) -> bool:
    """Can this machine's OpenSSL speak TLS 1.1 at all (Debian builds may not)? Probe with a
    local Python server that allows it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    try:
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
        server_ctx.set_ciphers("ALL:@SECLEVEL=0")
        client = _legacy_client(pki)
    except (ValueError, ssl.SSLError):
        return False
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except OSError:
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                ok = s.version() == "TLSv1.1"
                s.sendall(b"x")
        except (OSError, ssl.SSLError):
            ok = False
        thread.join(5)
    return ok


def _legacy_client(pki: PKI) -> ssl.SSLContext:
    ctx = pki.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_clients_are_refused_and_audited(
    tls_gateway: TLSGateway, version: ssl.TLSVersion
) -> None:
    pki = tls_gateway.pki
    if not _legacy_tls_available(pki):
        pytest.skip("this machine's OpenSSL cannot negotiate TLS 1.1 even with a willing peer")
    before = len(tls_gateway.alerts())
    ctx = _legacy_client(pki)
    ctx.minimum_version = ctx.maximum_version = version
    reason = tls_refusal(tls_gateway.tls_port, ctx)
    assert reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"}, reason
    alert = tls_gateway.wait_alert(before)
    assert str(alert["detail"]).startswith("DICOM TLS handshake refused")
    assert "PROTOCOL" in str(alert["detail"]), alert


def test_an_expired_client_certificate_is_refused_and_audited(
    tls_gateway: TLSGateway, tmp_path: Path
) -> None:
    pki = tls_gateway.pki
    expired = issue(tmp_path, "expired-client", pki.ca, client=True, expired=True)
    before, accepted = len(tls_gateway.alerts()), tls_gateway.accepted_associations()
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(expired.cert, expired.key)
    assert tls_refusal(tls_gateway.tls_port, ctx) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    r = echoscu(tls_gateway.tls_port, *dcmtk_tls(expired.key, expired.cert, pki.ca_cert))
    assert r.returncode != 0
    assert "certificate has expired" in str(tls_gateway.wait_alert(before)["detail"])
    assert tls_gateway.accepted_associations() == accepted
    assert (
        echoscu(
            tls_gateway.tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert)
        ).returncode
        == 0
    )


# --- the plain port alongside ------------------------------------------------------------


def test_plain_port_keeps_working_alongside_tls(tls_gateway: TLSGateway, tmp_path: Path) -> None:
    gw = tls_gateway.gw
    assert gw.dicom_port != tls_gateway.tls_port
    r = echoscu(gw.dicom_port)
    assert r.returncode == 0, r.stdout + r.stderr
    files = make_study(tmp_path / "s", series=[SeriesSpec("MR", count=2, rows=64, cols=64)])
    before = tls_gateway.received()
    r = run_dcmtk(storescu_args(files, port=gw.dicom_port, aet="STORESCU"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert tls_gateway.received() == before + 2
    # and TLS right after, on the same running gateway
    pki = tls_gateway.pki
    r = echoscu(tls_gateway.tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert))
    assert r.returncode == 0, r.stdout + r.stderr


# --- one stalled peer must not hold up the TLS port ---------------------------------------


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[tuple[GatewayProcess, PKI, int]]:
    """A TLS gateway with one idle TCP connection on its TLS port (accepted, no ClientHello)."""
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    gw = GatewayProcess(tls_config(tmp_path, pki, tls_port), tmp_path / "gateway.log").start()
    idle = socket.create_connection(("127.0.0.1", tls_port))
    try:
        time.sleep(0.2)  # the gateway has accepted it and waits for its ClientHello
        yield gw, pki, tls_port
    finally:
        idle.close()
        try:
            gw.stop(timeout=20)
        except subprocess.TimeoutExpired:
            gw.kill9()


def test_idle_tcp_connection_on_the_tls_port_does_not_block_other_tls_clients(
    stalled: tuple[GatewayProcess, PKI, int],
) -> None:
    gw, pki, tls_port = stalled
    # the plain port is another accept loop: it never stalls
    r = echoscu(gw.dicom_port, "-to", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    started = time.monotonic()
    try:
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw,
            pki.client_context().wrap_socket(raw, server_hostname="localhost") as s,
        ):
            version = s.version()
    except TimeoutError:
        version = None
    assert version is not None, "TLS handshake stalled behind an idle connection"
    assert time.monotonic() - started < 5


def test_sigterm_exits_while_an_idle_connection_sits_on_the_tls_port(
    stalled: tuple[GatewayProcess, PKI, int],
) -> None:
    gw, _, _ = stalled
    try:
        code = gw.stop(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, "the gateway did not exit within 10 s of SIGTERM"


# --- the client certificate bound to the calling AE ----------------------------------------


def test_a_caller_bound_to_a_certificate_subject_needs_that_certificate(tmp_path: Path) -> None:
    """allowed_callers: [{ae_title, hosts, cert_subject}]: the right AE title and host with
    another certificate from the same CA is refused; so is the plain port (no
    certificate); an expired or self-signed client certificate fails the handshake. Each
    refusal is a security-alert audit record."""
    from tests.certs import issue

    pki = make_pki(tmp_path / "pki")
    other_client = issue(tmp_path / "pki", "workstation-7", pki.ca, client=True)
    self_signed = issue(tmp_path / "pki", "selfmade", None, client=True)
    tls_port = free_port()
    config = tls_config(tmp_path, pki, tls_port)
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["dicom"]["allowed_callers"] = [
        {"ae_title": "ECHOSCU", "hosts": ["127.0.0.1"], "cert_subject": "CN=client"},
    ]
    config.write_text(yaml.safe_dump(cfg))
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    try:
        ok = echoscu(tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        wrong = echoscu(tls_port, *dcmtk_tls(other_client.key, other_client.cert, pki.ca_cert))
        assert wrong.returncode != 0
        assert "Calling AE Title Not Recognized" in wrong.stdout + wrong.stderr
        plain = echoscu(gw.dicom_port)
        assert plain.returncode != 0
        assert "Calling AE Title Not Recognized" in plain.stdout + plain.stderr
        forged = echoscu(tls_port, *dcmtk_tls(self_signed.key, self_signed.cert, pki.ca_cert))
        assert forged.returncode != 0
    finally:
        gw.stop()
    from gateway.security.audit import trail_path

    trail = [json.loads(line) for line in trail_path(gw.data_dir).read_text().splitlines()]
    alerts = [r for r in trail if r["event"] == "security-alert"]
    subjects = [a["actor"].get("cert_subject", "") for a in alerts]
    assert any("CN=workstation-7" in s for s in subjects), alerts
    assert any("TLS handshake refused" in a["detail"] for a in alerts), alerts
    accepted = [r for r in trail if r["event"] == "association" and r["outcome"] == "success"]
    assert len(accepted) == 1


def test_a_certificate_subject_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    from gateway.errors import ConfigError
    from gateway.preflight import load_config

    path = write_config(
        tmp_path,
        dicom={
            "allowed_callers": [
                {"ae_title": "PACS", "hosts": ["127.0.0.1"], "cert_subject": "XX=pacs,CN="}
            ]
        },
    )
    with pytest.raises(ConfigError, match="cert_subject"):
        load_config(path)


def test_renewed_certificate_files_are_loaded_on_sighup_and_expiry_shows_in_readyz(
    tmp_path: Path,
) -> None:
    import signal

    from cryptography import x509

    from tests.certs import issue

    pki = make_pki(tmp_path / "pki")  # its server certificate expires in a day
    tls_port = free_port()
    gw = GatewayProcess(tls_config(tmp_path, pki, tls_port), tmp_path / "gateway.log").start()
    try:
        code, body = gw.get("/readyz")
        details = json.loads(body)["details"]["certificates"]
        assert code == 200
        assert details["dicom.tls.cert"]["expires_soon"] is True
        assert 0 < details["dicom.tls.cert"]["days_left"] <= 1
        _, metrics = gw.get("/metrics")
        assert 'gateway_certificate_days_left{certificate="dicom.tls.cert"}' in metrics.decode()

        def served_serial() -> int:
            ctx = pki.client_context()
            with (
                socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                der = s.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

        before = served_serial()
        renewed = issue(tmp_path / "pki", "server", pki.ca, server=True, days=90)  # same paths
        assert renewed.cert == pki.server_cert
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any(_is(e, "tls reloaded") for e in gw.log_events()):
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.1)
        after = served_serial()
        new_serial = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
        assert after == new_serial != before
        details = json.loads(gw.get("/readyz")[1])["details"]["certificates"]
        assert details["dicom.tls.cert"]["expires_soon"] is False
        ok = echoscu(tls_port, *dcmtk_tls(pki.client_key, pki.client_cert, pki.ca_cert))
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        gw.stop()
